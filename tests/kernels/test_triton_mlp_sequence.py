"""Whole-sequence MLP memory kernel (kernels/memory/triton_mlp_sequence.py) == sequence_torch.

Every case compares :func:`mlp_memory_sequence` with :func:`kernels.memory.sequence_torch.memory_sequence`
(the chunk loop around ``chunk_torch.memory_chunk``): reads, final states and momenta, and the VJP of
every input (W1, W2, S1, S2, k, vhat/v, eta, alpha, beta, q) for a random cotangent, also with
per-row document resets (packed documents), and once against the documents run alone.

On a CPU machine the cases run under the Triton interpreter, which must be on before Python starts:
:func:`test_mlp_sequence_under_interpreter` re-runs this file in a subprocess with
``TRITON_INTERPRET=1`` and asserts that every interpreter case passed there (none skipped). Shapes
are tiny (N = 2 or 3 rows, d = 16, h = 32, T <= 70, 1 to 4 chunks) so the whole run stays well under 90 s on 2 cores.

Tolerances: fp32 kernel vs fp32 torch < 2e-5 (measured 4e-8 .. 6e-7 for outputs and every
gradient), vs the float64 torch path < 1e-4; bf16 tokens: outputs < 2e-5 (the kernel and the
reference see the same bf16-rounded values and both compute in fp32), gradients of the bf16 inputs
< 1e-2 (they come back rounded to bf16, one ulp ~ 4e-3 relative). The GPU test at the 760m / 1.3b
widths is at the end (skipped without CUDA).
"""
from __future__ import annotations

import os

import pytest
import torch

from kernels.memory import MemorySpec
from kernels.memory.sequence_torch import memory_sequence
from kernels.testing import run_interpreter_cases, as_leaves, flat_inputs, memory_inputs, rel_err

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interp = pytest.mark.skipif(not INTERP,
                            reason="interpreter case: runs in the subprocess of test_mlp_sequence_under_interpreter")
TOL = 2e-5
REF_TOL = 1e-4
N_INTERP_CASES = 23


@pytest.mark.slow
def test_mlp_sequence_under_interpreter():
    run_interpreter_cases(__file__, N_INTERP_CASES)


# ----------------------------------------------------------------------------------------------
SPECS = {
    "dgd_l2_mom": MemorySpec("mlp", "dgd", "l2", "chunk_start", True),
    "gd_l2": MemorySpec("mlp", "gd", "l2", "chunk_start", False),
    "gd_l2_mom": MemorySpec("mlp", "gd", "l2", "chunk_start", True),
    "dgd_l2": MemorySpec("mlp", "dgd", "l2", "chunk_start", False),
    "dgd_dot_mom": MemorySpec("mlp", "dgd", "dot", "chunk_start", True),
    "gd_dot": MemorySpec("mlp", "gd", "dot", "chunk_start", False),
    "dgd_l2_mom_nores": MemorySpec("mlp", "dgd", "l2", "chunk_start", True, residual=False),
}


def _run(fn, spec, ins, chunk, self_targets, resets=None):
    kw = {} if resets is None else dict(resets=resets)
    reads, state, mom = fn(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"], ins["alpha"],
                           ins["beta"], ins["q"], chunk, self_targets=self_targets, **kw)
    assert (reads is None) == (ins["q"] is None) and (mom is None) == (not spec.momentum)
    return [x for x in (reads,) + tuple(state) + (tuple(mom) if mom is not None else ()) if x is not None]


def _kernel(*args, **kw):
    from kernels.memory.triton_mlp_sequence import mlp_memory_sequence
    return mlp_memory_sequence(*args, **kw)


def _grads(outs, leaves, seed=123):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    return torch.autograd.grad(outs, list(leaves.values()), [c.to(o.dtype) for c, o in zip(cot, outs)],
                               allow_unused=True)


def _compare(spec, ins, chunk, self_targets, tol=TOL, ref_ins=None, grad_tol=None, resets=None):
    """Kernel on ``ins`` vs the torch path on ``ref_ins`` (default ``ins``): outputs and every grad."""
    grad_tol = tol if grad_tol is None else grad_tol
    ref_ins = ins if ref_ins is None else ref_ins
    out = _run(_kernel, spec, ins, chunk, self_targets, resets)
    ref = _run(memory_sequence, spec, ref_ins, chunk, self_targets, resets)
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) < tol, f"output {i}: rel err {rel_err(a, b):.2e}"
    leaves, ref_leaves = flat_inputs(ins), flat_inputs(ref_ins)
    ga = dict(zip(leaves, _grads(out, leaves)))
    gb = dict(zip(ref_leaves, _grads(ref, ref_leaves)))     # ref_ins may hold more leaves (zero mom)
    for name in leaves:
        x, y = ga[name], gb[name]
        assert y is not None and x is not None, f"grad {name}: kernel {x is not None}, torch {y is not None}"
        assert x.dtype == leaves[name].dtype, f"grad {name} dtype {x.dtype}"
        assert rel_err(x, y) < grad_tol, f"grad {name}: rel err {rel_err(x, y):.2e}"


# (spec, T, chunk, self_targets, q given, d_out): short last chunks everywhere but T=16/C=8
CASES = {
    "hope_main": ("dgd_l2_mom", 13, 8, True, True, None),
    "plain_targets": ("dgd_l2_mom", 13, 8, False, True, None),
    "gd_no_momentum": ("gd_l2", 13, 8, False, True, None),
    "gd_momentum_self": ("gd_l2_mom", 16, 8, True, True, None),
    "dgd_no_momentum_self": ("dgd_l2", 11, 8, True, True, None),
    "dot_loss": ("dgd_dot_mom", 13, 8, False, True, None),
    "dot_loss_self_no_q": ("gd_dot", 13, 8, True, False, None),
    "no_q": ("dgd_l2_mom", 13, 8, True, False, None),
    "residual_off": ("dgd_l2_mom_nores", 13, 8, True, True, None),
    "widths_differ": ("dgd_l2_mom", 13, 4, False, True, 24),       # d_in 16, d_out 24: no residual
    "one_short_chunk": ("dgd_l2_mom", 5, 8, True, True, None),
    "chunk_1": ("dgd_l2_mom", 4, 1, True, True, None),
    "chunk_64": ("dgd_l2_mom", 70, 64, True, True, None),
}


@interp
@pytest.mark.parametrize("case", list(CASES))
def test_interp_mlp_sequence_vs_torch(case):
    name, T, chunk, self_targets, has_q, d_out = CASES[case]
    spec = SPECS[name]
    ins = memory_inputs(spec, N=2, T=T, d=16, e=2, d_out=d_out,
                        eta_scale=0.5 if chunk == 64 else 1.0)
    if not has_q:
        ins["q"] = None
    _compare(spec, ins, chunk, self_targets)


@interp
def test_interp_mlp_sequence_tiles(monkeypatch):
    """Several tiles of d_in, d_out and h (caps lowered to 16, widths not multiples of 16) carried
    through 2 chunks of 16 + 1 token."""
    from kernels.memory import triton_impl
    monkeypatch.setitem(triton_impl.TILE_CAP, "o", 16)
    monkeypatch.setitem(triton_impl.TILE_CAP, "d", 16)
    spec = SPECS["dgd_l2_mom"]
    ins = memory_inputs(spec, N=2, T=33, d=20, e=2, eta_scale=0.5)
    _compare(spec, ins, 16, True)


@interp
def test_interp_mlp_sequence_vs_float64():
    """fp32 kernel vs the float64 torch path (HOPE's main memory: dgd, l2, momentum, self targets)."""
    spec = SPECS["dgd_l2_mom"]
    ins = memory_inputs(spec, N=2, T=21, d=16, e=2)
    _compare(spec, ins, 8, True, tol=REF_TOL, ref_ins={k: as_leaves(v, torch.float64) for k, v in ins.items()})


@interp
@pytest.mark.parametrize("self_targets", [True, False], ids=["self", "plain"])
def test_interp_mlp_sequence_bf16_tokens(self_targets):
    """bf16 k, vhat, q, eta, alpha with fp32 state: the kernel upcasts on load; the reference runs
    in fp32 on the same (bf16-rounded) values. Grads of bf16 inputs come back bf16."""
    spec = SPECS["dgd_l2_mom"]
    ins = memory_inputs(spec, N=2, T=13, d=16, e=2, token_dtype=torch.bfloat16)
    ref_ins = {k: as_leaves(v, torch.float32) for k, v in ins.items()}
    _compare(spec, ins, 8, self_targets, ref_ins=ref_ins, grad_tol=1e-2)


@interp
def test_interp_one_launch_forward_one_backward(monkeypatch):
    """Forward and backward are each exactly one Triton launch, whatever T (counted at the
    interpreter's launch entry point, so any other kernel launch would show up too)."""
    from triton.runtime.interpreter import InterpretedFunction
    from kernels.memory import triton_mlp_sequence as mod
    launches = []
    orig = InterpretedFunction.run

    def counting_run(self, *args, **kw):
        launches.append(self.fn.__name__)
        return orig(self, *args, **kw)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    spec = SPECS["dgd_l2_mom"]
    for T in (3, 13):                       # 1 and 4 chunks of 4
        ins = memory_inputs(spec, N=2, T=T, d=16, e=2)
        launches.clear()
        before = dict(mod.LAUNCHES)
        out = _run(_kernel, spec, ins, 4, True)
        assert launches == ["mlp_seq_fwd_kernel"], (T, launches)
        _grads(out, flat_inputs(ins))
        assert launches == ["mlp_seq_fwd_kernel", "mlp_seq_bwd_kernel"], (T, launches)
        assert mod.LAUNCHES["fwd"] - before["fwd"] == 1 and mod.LAUNCHES["bwd"] - before["bwd"] == 1


# -- packed documents: per-row resets ---------------------------------------------------------
# T = 13, chunk 4: chunks of 4, 4, 4, 1 tokens. Row 0: documents start at chunks 1 and 3 (the short
# last chunk); row 1: consecutive starts at chunks 1 and 2; row 2: only column 0 set (ignored: no
# reset at all).
RESETS = torch.tensor([[False, True, False, True], [False, True, True, False], [True, False, False, False]])
RESET_CASES = {   # (spec, self_targets, mom given)
    "mom_self": ("dgd_l2_mom", True, True),
    "mom_plain_zero_mom": ("gd_l2_mom", False, False),    # mom None: restarts from zero momentum
    "nomom_self": ("dgd_l2", True, True),
    "nomom_plain": ("gd_l2", False, True),
}


@interp
@pytest.mark.parametrize("case", list(RESET_CASES))
def test_interp_mlp_sequence_resets_vs_torch(case):
    """Resets (N, n_chunks) == sequence_torch.memory_sequence(..., resets=): reads, final states,
    every input gradient (those of the initial state/momentum collect every reset chunk)."""
    name, self_targets, mom_given = RESET_CASES[case]
    spec = SPECS[name]
    ins = memory_inputs(spec, N=3, T=13, d=16, e=2, seed=3)
    ref_ins = None
    if not mom_given:   # the torch path takes the zero momentum explicitly
        ref_ins = dict(ins, mom=as_leaves(tuple(torch.zeros_like(x) for x in ins["state"]), torch.float32))
        ins["mom"] = None
    _compare(spec, ins, 4, self_targets, ref_ins=ref_ins, resets=RESETS)


@interp
def test_interp_mlp_sequence_resets_vs_documents_alone():
    """Row 0 packs two documents (chunks 0-1 and 2-3, the last short), row 1 one: the packed kernel
    run equals each document run alone (torch), outputs and every input gradient."""
    spec = SPECS["dgd_l2_mom"]
    C, T = 4, 14
    ins = memory_inputs(spec, N=2, T=T, d=16, e=2, seed=7)
    resets = torch.tensor([[False, False, True, False], [False, False, False, False]])
    out = _run(_kernel, spec, ins, C, True, resets)

    whole = _run(memory_sequence, spec, ins, C, True)
    sl = slice(2 * C, T)
    tail = _run(memory_sequence, spec, dict(ins, **{x: ins[x][:, sl] for x in ("k", "vhat", "eta", "alpha", "q")}),
                C, True)
    alone = [torch.stack([torch.cat([whole[0][0, :2 * C], tail[0][0]]), whole[0][1]])]
    alone += [torch.stack([a[0], b[1]]) for a, b in zip(tail[1:], whole[1:])]
    assert len(out) == len(alone)
    for i, (a, b) in enumerate(zip(out, alone)):
        assert a.shape == b.shape and rel_err(a, b) < TOL, f"output {i}: rel err {rel_err(a, b):.2e}"
    leaves = flat_inputs(ins)
    for name, x, y in zip(leaves, _grads(out, leaves), _grads(alone, leaves)):
        assert x is not None and y is not None and rel_err(x, y) < TOL, f"grad {name}: rel err {rel_err(x, y):.2e}"


def test_mlp_sequence_refuses_bad_arguments():
    pytest.importorskip("triton")
    from kernels.memory.triton_mlp_sequence import mlp_memory_sequence
    spec = SPECS["dgd_l2_mom"]
    ins = memory_inputs(spec, N=1, T=4, d=16, e=2, d_out=8)
    args = (ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"], ins["alpha"], ins["beta"], ins["q"])
    with pytest.raises(ValueError, match="d_in == d_out"):
        mlp_memory_sequence(spec, *args, 4, self_targets=True)
    with pytest.raises(ValueError, match="chunk length 65"):
        mlp_memory_sequence(spec, *args, 65)
    with pytest.raises(ValueError, match="MLP memory"):
        mlp_memory_sequence(MemorySpec("linear"), *args, 4)
    with pytest.raises(ValueError, match="resets must be"):
        mlp_memory_sequence(spec, *args, 4, resets=torch.zeros(1, 2, dtype=torch.bool))


# -- GPU: the 760m / 1.3b state widths ----------------------------------------------------------
GPU_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}   # chosen before any GPU run (unmeasured)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("token_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [128, 256])
def test_gpu_mlp_sequence_preset_widths(d, token_dtype):
    """HOPE's main memory (dgd, l2, momentum, self targets) at d_in = d_out = d, h = 2d, T = 4096,
    chunk 64, N = 8 rows vs the float64 torch path on the same (possibly bf16-rounded) values."""
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = SPECS["dgd_l2_mom"]
    ins = memory_inputs(spec, N=8, T=4096, d=d, e=2, token_dtype=token_dtype, device="cuda",
                        eta_scale=1 / 16, alpha_gap=0.002)
    ref_ins = {k: as_leaves(v, torch.float64) for k, v in ins.items()}
    out = _run(_kernel, spec, ins, 64, True)
    ref = _run(memory_sequence, spec, ref_ins, 64, True)
    tol = GPU_TOL[token_dtype]
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < tol, f"output {i}: rel err {rel_err(a, b):.2e}"
    g = torch.Generator(device="cuda").manual_seed(1)
    cot = [torch.randn(b.shape, device="cuda", dtype=torch.float64, generator=g) for b in ref]
    leaves, ref_leaves = flat_inputs(ins), flat_inputs(ref_ins)
    ga = torch.autograd.grad(out, list(leaves.values()), [c.to(a.dtype) for c, a in zip(cot, out)])
    gb = torch.autograd.grad(ref, list(ref_leaves.values()), cot)
    for name, x, y in zip(leaves, ga, gb):
        assert rel_err(x, y) < tol, f"grad {name}: rel err {rel_err(x, y):.2e}"
