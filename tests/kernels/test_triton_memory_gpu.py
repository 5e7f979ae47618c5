"""Triton memory kernels on a CUDA device at realistic shapes (docs/MODEL.md §5, "One function, several implementations"); skipped without CUDA.

Shapes: N = 32 rows (16 heads x batch 2), head width d = 64 / 128, chunk 64, T = 4096 through the
model's chunk loop, plus T = 1000 (a short last chunk of 40 tokens). The reference is the
chunk-parallel PyTorch form in float64 on the same device, fed the same (possibly bf16-rounded)
values, so the errors below are the kernels' own arithmetic error.

Tolerances (relative Frobenius error, :func:`kernels.testing.rel_err`), chosen before any GPU run:
- float32 inputs, IEEE fp32 dots: outputs, states and every gradient < 1e-3;
- bf16 tokens (k, vhat, q, eta, alpha) with fp32 state, TF32 dots: < 3e-2.
Speed is measured by bench/kernels.py, never asserted here.
"""
from __future__ import annotations

import pytest
import torch

from kernels.memory import MemorySpec
from kernels.testing import as_leaves, flat_inputs, memory_inputs, rel_err, run_sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = {
    "hope_main_linear": MemorySpec("linear", "dgd", "l2", "running", True),
    "gated_deltanet": MemorySpec("linear", "gd", "l2", "running", False),
    "linear_chunk_start": MemorySpec("linear", "dgd", "l2", "chunk_start", True),
    "mlp_dgd_mom": MemorySpec("mlp", "dgd", "l2", "chunk_start", True),
}
TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def _sequence_kernel(spec, ins, chunk, impl):
    from kernels.memory.dispatch import memory_sequence
    reads, state, mom = memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"],
                                        ins["alpha"], ins["beta"], ins["q"], chunk, impl=impl)
    return (reads,) + tuple(state) + (tuple(mom) if mom is not None else ())


def _compare(spec, N, T, d, chunk, token_dtype, e=2, runner=run_sequence):
    torch.backends.cuda.matmul.allow_tf32 = False
    # eta ~ 1/16 of the short-run range and alpha >= 0.998: stable and not decayed to 0 at T = 4096
    ins = memory_inputs(spec, N=N, T=T, d=d, e=e, token_dtype=token_dtype, device="cuda",
                        eta_scale=1 / 16, alpha_gap=0.002)
    ref_ins = {k: as_leaves(v, torch.float64) for k, v in ins.items()}
    out = runner(spec, ins, chunk, "triton")
    ref = run_sequence(spec, ref_ins, chunk, "torch")
    tol = TOL[token_dtype]
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.dtype in (torch.float32, token_dtype)
        assert rel_err(a, b) < tol, f"output {i}: rel err {rel_err(a, b):.2e}"
    g = torch.Generator(device="cuda").manual_seed(1)
    cot = [torch.randn(b.shape, device="cuda", dtype=torch.float64, generator=g) for b in ref]
    leaves, ref_leaves = flat_inputs(ins), flat_inputs(ref_ins)
    ga = torch.autograd.grad(out, list(leaves.values()), [c.to(a.dtype) for c, a in zip(cot, out)])
    gb = torch.autograd.grad(ref, list(ref_leaves.values()), cot)
    for name, x, y in zip(leaves, ga, gb):
        assert rel_err(x, y) < tol, f"grad {name}: rel err {rel_err(x, y):.2e}"


@pytest.mark.parametrize("token_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_sequence_4k(name, d, token_dtype):
    _compare(SPECS[name], N=32, T=4096, d=d, chunk=64, token_dtype=token_dtype)


@pytest.mark.parametrize("token_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["hope_main_linear", "mlp_dgd_mom"])
def test_gpu_short_last_chunk(name, token_dtype):
    _compare(SPECS[name], N=32, T=1000, d=64, chunk=64, token_dtype=token_dtype, e=4)


@pytest.mark.parametrize("token_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [4096, 1000])
@pytest.mark.parametrize("name", ["hope_main_linear", "gated_deltanet"])
def test_gpu_whole_sequence_kernel(name, T, token_dtype):
    """The chunk loop inside the kernel (kernels/memory/triton_sequence.py), d = 128."""
    _compare(SPECS[name], N=32, T=T, d=128, chunk=64, token_dtype=token_dtype, runner=_sequence_kernel)


def test_gpu_rows_are_isolated():
    """Rows of different content (sequences x heads) do not mix."""
    spec = SPECS["hope_main_linear"]
    ins = memory_inputs(spec, N=4, T=200, d=64, device="cuda")
    batched = run_sequence(spec, ins, 64, "triton")
    one = {k: (tuple(x[2:3] for x in v) if isinstance(v, tuple) else v[2:3] if v is not None else None)
           for k, v in ins.items()}
    alone = run_sequence(spec, one, 64, "triton")
    for a, b in zip(batched, alone):
        assert rel_err(a[2:3], b) < 1e-6


def test_gpu_auto_dispatch_picks_triton():
    from kernels.memory.dispatch import resolve_impl
    assert resolve_impl("auto", torch.device("cuda")) == "triton"
