"""Triton memory kernels == the PyTorch references, forward and every input gradient (docs/MODEL.md §5, "One function, several implementations").

On a CPU machine the cases run under the Triton interpreter, which must be switched on before
Python starts: :func:`test_kernels_under_interpreter` re-runs this file in a subprocess with
``TRITON_INTERPRET=1`` and asserts that every interpreter case passed there (none skipped). Run
with ``TRITON_INTERPRET=1`` directly, the cases run in-process and the driver skips. Shapes stay
tiny (the interpreter costs ~5 ms per program per loop step): float32, a few rows, a few chunks.

Packed documents restart inside the whole-sequence kernels (``resets``, the ``*_resets`` cases);
rows never mix (``test_rows_are_isolated``).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.memory import MemorySpec, chunk_torch
from kernels.testing import run_interpreter_cases, as_leaves, flat_inputs, memory_inputs, rel_err, run_sequence

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interp = pytest.mark.skipif(not INTERP,
                            reason="interpreter case: runs in the subprocess of test_kernels_under_interpreter")
TOL = 2e-5          # float32 kernels vs float32 chunk_torch (observed ~1e-7 .. 1e-6)
REF_TOL = 1e-4      # float32 kernels vs the float64 token-by-token reference


@pytest.mark.slow
def test_kernels_under_interpreter():
    run_interpreter_cases(__file__, 39)


# ----------------------------------------------------------------------------------------------
def _affine_inputs(N, c, o, d, mom, has_c, has_rho, has_q, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = dict(
        W0=r(N, o, d) * 0.5, S0=r(N, o, d) * 0.1 if mom else None,
        K=F.normalize(r(N, c, d), dim=-1), Q=r(N, c, d) if has_q else None,
        c=torch.rand(N, c, generator=g) * 0.8 if has_c else None,
        rho=-torch.rand(N, c, generator=g) * 0.8 if has_rho else None,
        w=r(N, c, o), log_alpha=torch.log(0.7 + 0.3 * torch.rand(N, c, generator=g)),
        beta=0.05 + 0.9 * torch.rand(N, generator=g) if mom else None,
    )
    return {k: (v.requires_grad_() if v is not None else None) for k, v in ins.items()}


def _check_outputs_and_grads(fn_a, fn_b, inputs, tol, grad_tol=None):
    """Same outputs, and the same VJP for a random cotangent, for every tensor in ``inputs``."""
    grad_tol = tol if grad_tol is None else grad_tol
    out_a, out_b = fn_a(), fn_b()
    pairs = [(a, b) for a, b in zip(out_a, out_b) if b is not None]
    assert all(a is not None for a, _ in pairs)
    for i, (a, b) in enumerate(pairs):
        assert rel_err(a, b) < tol, f"output {i}: rel err {rel_err(a, b):.2e}"
    g = torch.Generator().manual_seed(123)
    cot = [torch.randn(b.shape, generator=g, dtype=b.dtype) for _, b in pairs]
    names = [k for k, v in inputs.items() if v is not None]
    leaves = [inputs[k] for k in names]
    ga = torch.autograd.grad([a for a, _ in pairs], leaves, [x.to(a.dtype) for x, (a, _) in zip(cot, pairs)],
                             allow_unused=True)
    gb = torch.autograd.grad([b for _, b in pairs], leaves, cot, allow_unused=True)
    for name, x, y in zip(names, ga, gb):
        if y is None:
            assert x is None or x.abs().max() == 0, f"grad {name}: reference has none"
            continue
        assert x is not None, f"grad {name} missing"
        assert rel_err(x, y.to(x.dtype)) < grad_tol, f"grad {name}: rel err {rel_err(x, y.to(x.dtype)):.2e}"


AFFINE_FLAGS = [  # (momentum, c (dgd), rho (running grad), reads)
    (True, True, True, True), (False, True, True, True), (True, False, True, True),
    (True, True, False, True), (True, False, False, True), (False, False, False, False),
    (True, True, True, False),
]


@interp
@pytest.mark.parametrize("flags", AFFINE_FLAGS, ids=lambda f: "mom%d_c%d_rho%d_q%d" % f)
def test_interp_affine_rank1_chunk(flags):
    from kernels.memory import triton_impl
    mom, has_c, has_rho, has_q = flags
    ins = _affine_inputs(3, 11, 5, 7, mom, has_c, has_rho, has_q)
    _check_outputs_and_grads(lambda: triton_impl.affine_rank1_chunk(**ins),
                             lambda: chunk_torch.affine_rank1_chunk(**ins), ins, TOL)


@interp
@pytest.mark.parametrize("c", [1, 16, 17, 64])
def test_interp_affine_tiles(c, monkeypatch):
    """Several column blocks and input tiles (caps lowered to 16), chunk lengths at tile edges."""
    from kernels.memory import triton_impl
    monkeypatch.setitem(triton_impl.TILE_CAP, "o", 16)
    monkeypatch.setitem(triton_impl.TILE_CAP, "d", 16)
    ins = _affine_inputs(2, c, 37, 33, True, True, True, True, seed=c)
    _check_outputs_and_grads(lambda: triton_impl.affine_rank1_chunk(**ins),
                             lambda: chunk_torch.affine_rank1_chunk(**ins), ins, TOL)


@interp
@pytest.mark.parametrize("spread,erase", [(0.1, 1.0), (0.01, 1.9)])
def test_interp_blocked_inverse_is_stable(spread, erase):
    """Chunk 64 (four 16-blocks), nearly parallel keys, strong erase (I - eta k k^T near its
    stability edge): the blocked triangular inverse stays as accurate as an fp32 triangular solve."""
    from kernels.memory import triton_impl
    g = torch.Generator().manual_seed(3)
    N, c, o, d = 2, 64, 16, 16
    K = F.normalize(torch.randn(N, 1, d, generator=g) + spread * torch.randn(N, c, d, generator=g), dim=-1)
    ins = dict(W0=torch.randn(N, o, d, generator=g), S0=0.1 * torch.randn(N, o, d, generator=g), K=K,
               Q=torch.randn(N, c, d, generator=g), c=torch.full((N, c), erase / 2),
               rho=torch.full((N, c), -erase / 2), w=0.1 * torch.randn(N, c, o, generator=g),
               log_alpha=torch.full((N, c), 0.99).log(), beta=torch.full((N,), 0.9))
    out = triton_impl.affine_rank1_chunk(**ins)
    ref = chunk_torch.affine_rank1_chunk(**{k: v.double() for k, v in ins.items()})
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-4


# ----------------------------------------------------------------------------------------------
SPECS = {
    "lin_dgd_l2_running_mom": MemorySpec("linear", "dgd", "l2", "running", True),
    "lin_dgd_l2_chunkstart_mom": MemorySpec("linear", "dgd", "l2", "chunk_start", True),
    "lin_gd_l2_running": MemorySpec("linear", "gd", "l2", "running", False),
    "lin_dgd_dot": MemorySpec("linear", "dgd", "dot", "chunk_start", False),
    "lin_gd_l2_chunkstart_mom": MemorySpec("linear", "gd", "l2", "chunk_start", True),
    "mlp_dgd_l2_mom": MemorySpec("mlp", "dgd", "l2", "chunk_start", True),
    "mlp_gd_l2": MemorySpec("mlp", "gd", "l2", "chunk_start", False),
    "mlp_dgd_dot_mom": MemorySpec("mlp", "dgd", "dot", "chunk_start", True),
}


@interp
@pytest.mark.parametrize("name", list(SPECS))
def test_interp_memory_chunk_vs_torch(name):
    """Three chunks of 8, 8 and 5 tokens (short last chunk); outputs, states and all gradients."""
    spec = SPECS[name]
    ins = memory_inputs(spec, N=3, T=21, d=8)
    _check_outputs_and_grads(lambda: run_sequence(spec, ins, 8, "triton"),
                             lambda: run_sequence(spec, ins, 8, "torch"), flat_inputs(ins), TOL)


@interp
@pytest.mark.parametrize("name", ["lin_dgd_l2_running_mom", "mlp_dgd_l2_mom"])
def test_interp_memory_chunk_vs_reference(name):
    """Against the token-by-token semantics (float64 reference, float32 kernel)."""
    spec = SPECS[name]
    ins = memory_inputs(spec, N=2, T=13, d=8)
    ref_ins = {k: as_leaves(v, torch.float64) for k, v in ins.items()}
    out = run_sequence(spec, ins, 6, "triton")
    ref = run_sequence(spec, ref_ins, 6, "reference")
    for i, (a, b) in enumerate(zip(out, ref)):
        assert rel_err(a, b) < REF_TOL, f"output {i}: rel err {rel_err(a, b):.2e}"


@interp
def test_interp_projection_memory_width_one():
    """eta/alpha projection memories write a 1-wide output (one column block, 15 masked)."""
    spec = SPECS["mlp_dgd_l2_mom"]
    ins = memory_inputs(spec, N=2, T=10, d=8, d_out=1)
    _check_outputs_and_grads(lambda: run_sequence(spec, ins, 4, "triton"),
                             lambda: run_sequence(spec, ins, 4, "torch"), flat_inputs(ins), TOL)


@interp
def test_interp_rows_are_isolated():
    """A batch of rows gives each row what it gives alone (documents are rows, see module doc)."""
    spec = SPECS["lin_dgd_l2_running_mom"]
    ins = memory_inputs(spec, N=3, T=9, d=8)
    batched = run_sequence(spec, ins, 4, "triton")
    for row in range(3):
        one = {k: (tuple(x[row:row + 1] for x in v) if isinstance(v, tuple) else
                   v[row:row + 1] if v is not None else None) for k, v in ins.items()}
        alone = run_sequence(spec, one, 4, "triton")
        for a, b in zip(batched, alone):
            assert rel_err(a[row:row + 1], b) < 1e-6


@interp
def test_interp_dispatch_allows_cpu_under_interpreter():
    from kernels.memory.dispatch import resolve_impl
    assert resolve_impl("triton", torch.device("cpu")) == "triton"


# -- whole-sequence kernel (chunk loop inside the kernel) ---------------------------------------
SEQ_SPECS = ["lin_dgd_l2_running_mom", "lin_gd_l2_running", "lin_dgd_dot"]


def run_memory_sequence(spec, ins, chunk, impl, resets=None):
    from kernels.memory.dispatch import memory_sequence
    reads, state, mom = memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"],
                                        ins["alpha"], ins["beta"], ins["q"], chunk, impl=impl, resets=resets)
    return (reads,) + tuple(state) + (tuple(mom) if mom is not None else ())


@interp
@pytest.mark.parametrize("name", SEQ_SPECS)
def test_interp_sequence_kernel_vs_chunk_loop(name):
    """One launch over 21 tokens in chunks of 8 (short last chunk) == the chunk loop in PyTorch."""
    spec = SPECS[name]
    ins = memory_inputs(spec, N=3, T=21, d=8)
    _check_outputs_and_grads(lambda: run_memory_sequence(spec, ins, 8, "triton"),
                             lambda: run_memory_sequence(spec, ins, 8, "torch"), flat_inputs(ins), TOL)


@interp
def test_interp_sequence_kernel_tiles(monkeypatch):
    """Several column blocks and input tiles carried through 3 chunks of 16 + 1 token."""
    from kernels.memory import triton_impl
    monkeypatch.setitem(triton_impl.TILE_CAP, "o", 16)
    monkeypatch.setitem(triton_impl.TILE_CAP, "d", 16)
    spec = SPECS["lin_dgd_l2_running_mom"]
    ins = memory_inputs(spec, N=2, T=49, d=20, d_out=36)
    _check_outputs_and_grads(lambda: run_memory_sequence(spec, ins, 16, "triton"),
                             lambda: run_memory_sequence(spec, ins, 16, "torch"), flat_inputs(ins), TOL)


RESETS_3x3 = [[1, 1, 1],    # consecutive resets, the last (short) chunk included; column 0 ignored
              [0, 0, 1],    # a reset at the last, short chunk only
              [0, 1, 0]]    # a reset in the middle


def _check_resets(spec, ins, chunk, resets):
    """Kernel with resets == the PyTorch chunk loop with the same resets (outputs, final states,
    every input gradient), and the resets change the result."""
    resets = torch.tensor(resets, dtype=torch.bool)
    _check_outputs_and_grads(lambda: run_memory_sequence(spec, ins, chunk, "triton", resets),
                             lambda: run_memory_sequence(spec, ins, chunk, "torch", resets), flat_inputs(ins), TOL)
    with torch.no_grad():
        plain = run_memory_sequence(spec, ins, chunk, "torch")
        packed = run_memory_sequence(spec, ins, chunk, "torch", resets)
    assert rel_err(packed[1], plain[1]) > 1e-3      # final state


@interp
@pytest.mark.parametrize("name", SEQ_SPECS)
def test_interp_sequence_kernel_resets(name):
    """Packed documents (momentum on and off, running and dot gradients): 21 tokens in chunks of 8,
    three rows with different reset patterns."""
    spec = SPECS[name]
    _check_resets(spec, memory_inputs(spec, N=3, T=21, d=8, seed=5), 8, RESETS_3x3)


@interp
def test_interp_sequence_kernel_resets_tiles(monkeypatch):
    """Resets with three column blocks (each program restarts / flushes only its own block) and
    partial input tiles: 4 chunks (16, 16, 16, 1)."""
    from kernels.memory import triton_impl
    monkeypatch.setitem(triton_impl.TILE_CAP, "o", 16)
    monkeypatch.setitem(triton_impl.TILE_CAP, "d", 16)
    spec = SPECS["lin_dgd_l2_running_mom"]
    _check_resets(spec, memory_inputs(spec, N=2, T=49, d=20, d_out=36, seed=6), 16,
                  [[0, 1, 1, 1], [1, 0, 1, 0]])


@interp
def test_interp_sequence_kernel_refuses_state_dependent_writes():
    from kernels.memory.triton_sequence import linear_memory_sequence
    spec = SPECS["lin_dgd_l2_chunkstart_mom"]
    ins = memory_inputs(spec, N=1, T=4, d=8)
    with pytest.raises(ValueError, match="running or dot"):
        linear_memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"], ins["alpha"],
                               ins["beta"], ins["q"], 4)


@interp
@pytest.mark.parametrize("name", ["lin_dgd_l2_running_mom", "mlp_dgd_l2_mom"])
def test_interp_bf16_tokens_under_autocast(name):
    """bf16 k/vhat/q/eta/alpha with fp32 state under bf16 autocast: the kernels upcast on load and
    keep the state fp32, so they match the PyTorch path (which casts to fp32) to fp32 accuracy;
    gradients of the bf16 inputs are bf16, so they agree to bf16 rounding (one ulp ~ 4e-3)."""
    spec = SPECS[name]
    ins = memory_inputs(spec, N=2, T=13, d=8, token_dtype=torch.bfloat16)

    def run(impl):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_sequence(spec, ins, 6, impl)
    out = run("triton")
    assert all(o.dtype == torch.float32 for o in out)
    _check_outputs_and_grads(lambda: out, lambda: run("torch"), flat_inputs(ins), TOL, grad_tol=1e-2)


@interp
@pytest.mark.parametrize("family", ["hope", "gated_deltanet"])
def test_interp_model_with_triton_memories_equals_torch(family):
    """The whole tiny model (projection, main and CMS context memories) with memory_impl=triton."""
    from nl_pretrain.config import build_config
    from nl_pretrain.model import LanguageModel
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("triton", "torch"):
        m = {"preset": f"{family}-tiny", "d_model": 32, "n_heads": 2, "vocab_size": 64, "chunk_mem": 4,
             "chunk_proj": 3, "memory_impl": impl}
        if family == "hope":
            m["cms"] = [{"kind": "context", "period": 4, "expansion": 1.0},
                        {"kind": "step", "period": 1, "expansion": 2.0}]
        torch.manual_seed(0)
        model = LanguageModel(build_config({"model": m, "data": {"seq_len": 16}}).model)
        logits = model(x)
        weights = torch.sin(torch.arange(logits.numel(), dtype=logits.dtype)).view_as(logits)
        params = [p for p in model.parameters()]
        results.append((logits, torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)))
    (la, ga), (lb, gb) = results
    assert rel_err(la, lb) < TOL
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if b is not None:
            assert rel_err(a, b) < 1e-4
