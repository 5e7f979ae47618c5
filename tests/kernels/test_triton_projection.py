"""Whole-sequence Triton projection pass == ``sequence_torch.projection_sequence`` (outputs, final
states and every input gradient), and exactly one launch forward and one backward whatever T.

Interpreter cases (``test_interp_*``) need ``TRITON_INTERPRET=1`` before Python starts:
:func:`test_projection_kernel_under_interpreter` re-runs this file in a subprocess with it and
asserts all of them passed (none skipped). Run them in-process with
``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_projection.py -k test_interp_``. Shapes stay
tiny (d_h = 16, N = 2..3, T <= 40); the GPU cases (d_h = 128 / 256, T = 4096) skip on CPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.memory.spec import MemorySpec
from kernels.testing import run_interpreter_cases, as_leaves, rel_err

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interp = pytest.mark.skipif(not INTERP,
                            reason="interpreter case: runs in the subprocess of test_projection_kernel_under_interpreter")
TOL = 2e-5          # fp32 kernel vs fp32 sequence_torch
REF_TOL = 1e-4      # fp32 kernel vs float64 sequence_torch
N_INTERP_CASES = 17


@pytest.mark.slow
def test_projection_kernel_under_interpreter():
    run_interpreter_cases(__file__, N_INTERP_CASES)


# ----------------------------------------------------------------------------------------------
def projection_inputs(N, T, dh, momentum=True, u_dtype=torch.float32, device="cpu", seed=0):
    """Leaves requiring grad: P near 0.5 I on the k/v blocks plus noise, small eta/alpha rows,
    l2-normalised u, beta in (0.5, 0.9), biases that put eta near 0.1 eta_max.. and alpha near 0.9."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    R = 2 * dh + 2
    P = r(N, R, dh, scale=0.1)
    eye = torch.eye(dh).expand(N, dh, dh)
    P[:, :dh] += 0.5 * eye
    P[:, dh:2 * dh] += 0.5 * eye
    P[:, 2 * dh:] *= 3.0
    ins = dict(
        P=P, S=r(N, R, dh, scale=0.01) if momentum else None,
        u=F.normalize(r(N, T, dh), dim=-1),
        beta=0.5 + 0.4 * torch.rand(N, 4, generator=g) if momentum else None,
        eta_bias=r(N, scale=0.5) - 1.0, alpha_bias=r(N, scale=0.5) + 2.5,
    )
    return {k: as_leaves(v, u_dtype if k == "u" else torch.float32, device) for k, v in ins.items()}


def run(impl, spec, ins, chunk, eta_max=0.5, scale=1.0, resets=None):
    if impl == "triton":
        from kernels.memory.triton_projection import projection_sequence
    else:
        from kernels.memory.sequence_torch import projection_sequence
    (k, v, eta, alpha), P_T, S_T = projection_sequence(spec, ins["P"], ins["S"], ins["u"], ins["beta"],
                                                       ins["eta_bias"], ins["alpha_bias"], eta_max, chunk,
                                                       update_eta_scale=scale, resets=resets)
    return [k, v, eta, alpha, P_T] + ([S_T] if S_T is not None else [])


def check(spec, ins, chunk, tol=TOL, ref_tol=REF_TOL, du_tol=None, zero_S=False, **kw):
    """Outputs and the VJP of a random cotangent for every input, against fp32 and float64 torch
    (``du_tol`` for the gradient of u, against both, when u is bf16). ``zero_S``: the kernel gets
    ``S`` None with momentum on, the torch references an explicit zero ``S`` (their form needs one)."""
    names = [n for n, x in ins.items() if x is not None]
    leaves = [ins[n] for n in names]
    out = run("triton", spec, ins, chunk, **kw)
    assert all(o.dtype == torch.float32 for o in out)
    ref_ins = {n: (x.detach().float().requires_grad_() if x is not None else None) for n, x in ins.items()}
    ins64 = {n: as_leaves(x, torch.float64) for n, x in ins.items()}
    if zero_S:
        ref_ins["S"] = torch.zeros_like(ref_ins["P"]).detach()
        ins64["S"] = torch.zeros_like(ins64["P"]).detach()
    ref = run("torch", spec, ref_ins, chunk, **kw)
    ref64 = run("torch", spec, ins64, chunk, **kw)
    assert len(out) == len(ref) == len(ref64)
    g = torch.Generator().manual_seed(123)
    cot = [torch.randn(b.shape, generator=g, dtype=torch.float64) for b in ref64]
    errs = {}
    for i, (a, b, c) in enumerate(zip(out, ref, ref64)):
        errs[f"out{i}"] = (rel_err(a, b), rel_err(a, c))
    ga = torch.autograd.grad(out, leaves, [c.float() for c in cot])
    gb = torch.autograd.grad(ref, [ref_ins[n] for n in names], [c.float() for c in cot])
    gc = torch.autograd.grad(ref64, [ins64[n] for n in names], cot)
    for n, a, b, c in zip(names, ga, gb, gc):
        assert a is not None and a.dtype == ins[n].dtype, n
        errs["d" + n] = (rel_err(a.float(), b.float()), rel_err(a.double(), c))
    print({k: f"{x:.1e}/{y:.1e}" for k, (x, y) in errs.items()})
    for k, (e32, e64) in errs.items():
        t, rt = (du_tol, du_tol) if (k == "du" and du_tol is not None) else (tol, ref_tol)
        assert e32 < t, f"{k}: rel err vs fp32 torch {e32:.2e}"
        assert e64 < rt, f"{k}: rel err vs float64 torch {e64:.2e}"
    return errs


HOPE = MemorySpec("linear", "gd", "l2", "running", True)     # HOPE's projection preset
SPECS = {
    "gd_l2_running_mom": HOPE,
    "gd_l2_running": MemorySpec("linear", "gd", "l2", "running", False),
    "dgd_l2_running_mom": MemorySpec("linear", "dgd", "l2", "running", True),
    "gd_l2_chunkstart_mom": MemorySpec("linear", "gd", "l2", "chunk_start", True),
    "dgd_l2_chunkstart": MemorySpec("linear", "dgd", "l2", "chunk_start", False),
    "gd_dot_mom": MemorySpec("linear", "gd", "dot", "chunk_start", True),
    "dgd_dot": MemorySpec("linear", "dgd", "dot", "running", False),
}


def _mom(spec):
    return spec.momentum


@interp
@pytest.mark.parametrize("name", list(SPECS))
def test_interp_specs(name):
    """Every rule / loss / gradient point, momentum on and off: 21 tokens in chunks of 8 (short last)."""
    spec = SPECS[name]
    check(spec, projection_inputs(3, 21, 16, momentum=_mom(spec), seed=1), 8)


@interp
def test_interp_chunk_one():
    check(HOPE, projection_inputs(2, 5, 16, seed=2), 1)


@interp
def test_interp_full_chunks_and_scale():
    """T a multiple of C (16 + 16 + ...), update_eta_scale != 1, another eta_max."""
    check(HOPE, projection_inputs(2, 32, 16, seed=3), 16, eta_max=0.8, scale=0.37)


@interp
def test_interp_long_chunk():
    """Chunk 40 > 32: the BC = 64 tile (four 16-blocks in the inverse), one short chunk."""
    check(SPECS["dgd_l2_running_mom"], projection_inputs(2, 40, 16, seed=4), 40)


@interp
def test_interp_bf16_u():
    """bf16 u (upcast on load; TF32 dots on a GPU, fp32 in the interpreter): vs the torch path on the
    same bf16 values in fp32 and float64. Everything but du to fp32 accuracy; du comes back bf16
    (measured 1.6e-3 = bf16 rounding, one ulp ~ 4e-3)."""
    ins = projection_inputs(2, 21, 16, u_dtype=torch.bfloat16, seed=5)
    check(HOPE, ins, 8, du_tol=5e-3)


@interp
def test_interp_tiles(monkeypatch):
    """d_h = 24 with 16-wide caps: k/v groups of two row blocks (the second partial), partial d tiles."""
    from kernels.memory import triton_impl
    monkeypatch.setitem(triton_impl.TILE_CAP, "o", 16)
    monkeypatch.setitem(triton_impl.TILE_CAP, "d", 16)
    check(HOPE, projection_inputs(2, 13, 24, seed=6), 8)
    check(SPECS["dgd_l2_chunkstart"], projection_inputs(2, 13, 24, momentum=False, seed=7), 8)


@interp
def test_interp_one_launch_each_way(monkeypatch):
    """Forward and backward are exactly one Triton launch each (every Triton launch of the process
    is counted), for T = 5 (one chunk) and T = 29 (four chunks)."""
    from kernels.memory import triton_projection as tp
    kernel_cls = type(tp.projection_fwd_kernel)
    launched = []
    orig = kernel_cls.run

    def counting_run(self, *a, **k):
        launched.append(getattr(self, "__name__", None) or getattr(self.fn, "__name__", "?"))
        return orig(self, *a, **k)
    monkeypatch.setattr(kernel_cls, "run", counting_run)
    for T in (5, 29):
        ins = projection_inputs(2, T, 16, seed=T)
        launched.clear()
        before = dict(tp.LAUNCHES)
        out = run("triton", HOPE, ins, 8)
        assert len(launched) == 1, launched
        loss = sum((o * torch.randn_like(o)).sum() for o in out)
        launched.clear()
        loss.backward()
        assert len(launched) == 1, launched
        assert tp.LAUNCHES["fwd"] == before.get("fwd", 0) + 1 and tp.LAUNCHES["bwd"] == before.get("bwd", 0) + 1


# packed documents: per-row resets (N, n_chunks); column 0 is ignored (set in row 0 on purpose)
RESETS_3x3 = [[1, 1, 1],    # consecutive resets, the last (short) chunk included
              [0, 0, 1],    # a reset at the last, short chunk only
              [0, 1, 0]]    # a reset in the middle
RESETS_2x4 = [[0, 1, 1, 1],  # every chunk restarts (the last is one token)
              [1, 0, 1, 0]]


def check_resets(spec, ins, chunk, resets, zero_S=False):
    """``check`` with resets, and the resets change the result (vs the same inputs without)."""
    resets = torch.tensor(resets, dtype=torch.bool)
    check(spec, ins, chunk, resets=resets, zero_S=zero_S)
    tins = dict(ins, S=torch.zeros_like(ins["P"])) if zero_S else ins
    with torch.no_grad():
        plain = run("torch", spec, tins, chunk)
        packed = run("torch", spec, tins, chunk, resets=resets)
    assert rel_err(packed[4], plain[4]) > 1e-3      # final state


@interp
@pytest.mark.parametrize("name", ["gd_l2_running_mom", "dgd_l2_chunkstart"])
def test_interp_resets(name):
    """Packed documents, momentum on and off: 21 tokens in chunks of 8 (short last chunk), three
    rows with different reset patterns; every output, final state and input gradient."""
    spec = SPECS[name]
    check_resets(spec, projection_inputs(3, 21, 16, momentum=_mom(spec), seed=8), 8, RESETS_3x3)


@interp
def test_interp_resets_momentum_none():
    """Momentum on, ``S`` None (zero initial momentum, so a reset restarts from zero momentum),
    chunk-start L2 gradient: 13 tokens in chunks of 4 (4, 4, 4, 1); the PyTorch contract gets an
    explicit zero ``S``."""
    ins = projection_inputs(2, 13, 16, seed=9)
    ins["S"] = None
    check_resets(SPECS["gd_l2_chunkstart_mom"], ins, 4, RESETS_2x4, zero_S=True)


@interp
def test_interp_refuses_mlp():
    from kernels.memory.triton_projection import projection_sequence
    ins = projection_inputs(1, 4, 16)
    with pytest.raises(ValueError, match="linear"):
        projection_sequence(MemorySpec("mlp"), ins["P"], ins["S"], ins["u"], ins["beta"], ins["eta_bias"],
                            ins["alpha_bias"], 0.5, 4)


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dh", [128, 256])
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_projection_vs_float64(dh, u_dtype):
    """d_h = 128 / 256, T = 4096 in chunks of 64, N = 8 vs the float64 torch path on the same device
    (tolerances chosen before any GPU run: fp32 IEEE dots 1e-3, bf16 u with TF32 dots 3e-2)."""
    pytest.importorskip("triton")
    from kernels.memory.sequence_torch import projection_sequence as torch_seq
    from kernels.memory.triton_projection import projection_sequence
    tol = 1e-3 if u_dtype == torch.float32 else 3e-2
    ins = projection_inputs(8, 4096, dh, u_dtype=u_dtype, device="cuda", seed=11)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        (k, v, eta, alpha), P_T, S_T = projection_sequence(HOPE, ins["P"], ins["S"], ins["u"], ins["beta"],
                                                           ins["eta_bias"], ins["alpha_bias"], 0.5, 64)
        out = [k, v, eta, alpha, P_T, S_T]
        ins64 = {n: as_leaves(x, torch.float64) for n, x in ins.items()}
        (k, v, eta, alpha), P_T, S_T = torch_seq(HOPE, ins64["P"], ins64["S"], ins64["u"], ins64["beta"],
                                                 ins64["eta_bias"], ins64["alpha_bias"], 0.5, 64)
        ref = [k, v, eta, alpha, P_T, S_T]
        for i, (a, b) in enumerate(zip(out, ref)):
            assert rel_err(a, b) < tol, f"output {i}: {rel_err(a, b):.2e}"
        g = torch.Generator(device="cuda").manual_seed(0)
        cot = [torch.randn(b.shape, generator=g, device="cuda", dtype=torch.float64) for b in ref]
        names = list(ins)
        ga = torch.autograd.grad(out, [ins[n] for n in names], [c.float() for c in cot])
        gb = torch.autograd.grad(ref, [ins64[n] for n in names], cot)
        for n, a, b in zip(names, ga, gb):
            assert rel_err(a.double(), b) < tol, f"grad {n}: {rel_err(a.double(), b):.2e}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
