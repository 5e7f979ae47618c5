"""The chunk-parallel memory update equals the token-by-token reference (float64)."""
import itertools

import pytest
import torch

from kernels.memory import MemorySpec, memory_chunk
from kernels.memory.naive import inner_grad

DT = torch.float64
CASES = [c for c in itertools.product(["linear", "mlp"], ["gd", "dgd"], ["l2", "dot"],
                                       ["chunk_start", "running"], [False, True])
         if not (c[0] == "mlp" and c[3] == "running")]


def make_inputs(spec, N=3, c=7, d=5, dout=4, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    if spec.kind == "linear":
        state = (0.3 * r(N, dout, d),)
    else:
        state = (0.3 * r(N, dout, hidden), 0.3 * r(N, hidden, d))
    mom = tuple(0.1 * r(*s.shape) for s in state) if spec.momentum else None
    k = torch.nn.functional.normalize(r(N, c, d), dim=-1)
    vhat = r(N, c, dout)
    eta = 0.5 * torch.rand(N, c, generator=g, dtype=DT)
    alpha = 0.8 + 0.2 * torch.rand(N, c, generator=g, dtype=DT)
    beta = torch.rand(N, generator=g, dtype=DT) if spec.momentum else None
    q = r(N, c, d)
    return state, mom, k, vhat, eta, alpha, beta, q


@pytest.mark.parametrize("kind,rule,loss,grad_at,momentum", CASES)
@pytest.mark.parametrize("dout", [4, 5, 1])
def test_chunk_equals_token_by_token(kind, rule, loss, grad_at, momentum, dout):
    spec = MemorySpec(kind=kind, rule=rule, loss=loss, grad_at=grad_at, momentum=momentum)
    inputs = [t.requires_grad_() if isinstance(t, torch.Tensor) else t
              for t in make_inputs(spec, dout=dout)]
    state, mom, k, vhat, eta, alpha, beta, q = inputs
    for t in state + (mom or ()):
        t.requires_grad_()
    leaves = [t for t in list(state) + list(mom or ()) + [k, vhat, eta, alpha, q] + ([beta] if beta is not None else [])]
    outs = {}
    for impl in ("reference", "torch"):
        reads, new, new_mom = memory_chunk(spec, state, mom, k, vhat, eta, alpha, beta, q, impl=impl)
        flat = [reads] + list(new) + list(new_mom or ())
        w = [torch.sin(torch.arange(f.numel(), dtype=DT)).view_as(f) for f in flat]
        objective = sum((f * wi).sum() for f, wi in zip(flat, w))
        grads = torch.autograd.grad(objective, leaves)
        outs[impl] = (flat, grads)
    for a, b in zip(outs["reference"][0], outs["torch"][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(outs["reference"][1], outs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("loss", ["l2", "dot"])
def test_hand_written_inner_gradient_matches_autograd(kind, loss):
    spec = MemorySpec(kind=kind, loss=loss, momentum=False)
    state, _, k, vhat, *_ = make_inputs(spec, dout=5)
    state = tuple(s.clone().requires_grad_() for s in state)
    k1, v1 = k[:, 0], vhat[:, 0]
    from kernels.memory import memory_read
    pred = memory_read(spec, state, k1[:, None])[:, 0]
    inner = 0.5 * (pred - v1).pow(2).sum() if loss == "l2" else -(pred * v1).sum()
    auto = torch.autograd.grad(inner, state)
    for a, b in zip(inner_grad(spec, state, k1, v1), auto):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_running_gradient_is_rejected_for_mlp():
    with pytest.raises(ValueError, match="running.*linear"):
        MemorySpec(kind="mlp", grad_at="running")


def test_unknown_impl_is_an_error():
    spec = MemorySpec(momentum=False)
    state, mom, k, vhat, eta, alpha, beta, q = make_inputs(spec)
    with pytest.raises(ValueError, match="memory impl 'cuda'"):
        memory_chunk(spec, state, mom, k, vhat, eta, alpha, beta, q, impl="cuda")
