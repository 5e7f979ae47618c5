"""Whole-sequence PyTorch forms == the token-by-token reference (float64): outputs, final states and
every input gradient; the stacked projection pass == the four projection memories run one by one."""
import itertools

import pytest
import torch

from kernels.memory import MemorySpec
from kernels.memory.dispatch import memory_chunk, memory_sequence
from kernels.memory.sequence_torch import l2norm, projection_groups, projection_reads, projection_sequence
from kernels.memory.spec import memory_read
from kernels.testing import as_leaves, flat_inputs, memory_inputs

DT = torch.float64


def _flat(out):
    reads, state, mom = out
    return ((reads,) if reads is not None else ()) + tuple(state) + (tuple(mom) if mom is not None else ())


def _check(fn_a, fn_b, leaves, rtol=1e-9):
    a, b = fn_a(), fn_b()
    assert len(a) == len(b)
    w = [torch.sin(torch.arange(x.numel(), dtype=DT)).view_as(x) for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-11)
    names = list(leaves)
    ga = torch.autograd.grad(sum((x * v).sum() for x, v in zip(a, w)), list(leaves.values()), allow_unused=True)
    gb = torch.autograd.grad(sum((x * v).sum() for x, v in zip(b, w)), list(leaves.values()), allow_unused=True)
    for n, x, y in zip(names, ga, gb):
        assert (x is None) == (y is None), n
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-11, msg=lambda m: f"{n}: {m}")


CASES = [c for c in itertools.product(["linear", "mlp"], ["gd", "dgd"], ["l2", "dot"], ["chunk_start", "running"],
                                      [True, False], [False, True]) if not (c[0] == "mlp" and c[3] == "running")]


@pytest.mark.parametrize("kind,rule,loss,grad_at,momentum,self_targets", CASES)
@pytest.mark.parametrize("chunk", [1, 5])
def test_memory_sequence_equals_reference(kind, rule, loss, grad_at, momentum, self_targets, chunk):
    spec = MemorySpec(kind=kind, rule=rule, loss=loss, grad_at=grad_at, momentum=momentum)
    ins = memory_inputs(spec, N=2, T=13, d=4, dtype=DT, seed=3)        # T = 13: the last chunk is short

    def run(impl):
        return _flat(memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"],
                                     ins["alpha"], ins["beta"], ins["q"], chunk, self_targets=self_targets,
                                     impl=impl))
    _check(lambda: run("torch"), lambda: run("reference"), flat_inputs(ins))


def _projection_inputs(N, T, dh, momentum, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = 2 * dh + 2
    P = torch.randn(N, R, dh, generator=g, dtype=DT) * 0.2
    P[:, :2 * dh] += torch.cat([torch.eye(dh, dtype=DT)] * 2) * 0.5
    ins = dict(P=P, S=torch.randn(N, R, dh, generator=g, dtype=DT) * 0.01 if momentum else None,
               u=l2norm(torch.randn(N, T, dh, generator=g, dtype=DT)),
               beta=0.5 + 0.4 * torch.rand(N, 4, generator=g, dtype=DT) if momentum else None,
               eta_bias=torch.randn(N, generator=g, dtype=DT), alpha_bias=3 + torch.randn(N, generator=g, dtype=DT))
    return {k: as_leaves(v, DT) for k, v in ins.items()}


def _projection_one_by_one(spec, ins, chunk, eta_max, scale):
    """The projection memories as separate memories, each through the token-by-token reference."""
    groups = projection_groups(ins["u"].shape[-1])
    states = [(ins["P"][:, sl],) for sl in groups]
    moms = [(ins["S"][:, sl],) if ins["S"] is not None else None for sl in groups]
    T, pieces = ins["u"].shape[1], []
    for s in range(0, T, chunk):
        uc = ins["u"][:, s:s + chunk]
        P = torch.cat([st[0] for st in states], 1)
        k, v, eta, alpha = projection_reads(P, uc, ins["eta_bias"], ins["alpha_bias"], eta_max)
        for m in range(4):
            vhat = memory_read(spec, states[m], l2norm(v))
            beta = ins["beta"][:, m] if ins["beta"] is not None else None
            _, states[m], moms[m] = memory_chunk(spec, states[m], moms[m], k, vhat, eta * scale, alpha, beta,
                                                 impl="reference")
        pieces.append((k, v, eta, alpha))
    outs = tuple(torch.cat(p, 1) for p in zip(*pieces))
    P = torch.cat([st[0] for st in states], 1)
    S = torch.cat([m[0] for m in moms], 1) if moms[0] is not None else None
    return outs + (P,) + ((S,) if S is not None else ())


@pytest.mark.parametrize("rule,loss,grad_at", [("gd", "l2", "running"), ("dgd", "l2", "running"),
                                               ("gd", "l2", "chunk_start"), ("dgd", "dot", "chunk_start")])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("chunk", [1, 4])
def test_stacked_projection_equals_memories_one_by_one(rule, loss, grad_at, momentum, chunk):
    spec = MemorySpec(kind="linear", rule=rule, loss=loss, grad_at=grad_at, momentum=momentum)
    ins = _projection_inputs(N=2, T=11, dh=3, momentum=momentum)
    scale = 0.5 if grad_at == "chunk_start" else 1.0

    def stacked():
        (k, v, eta, alpha), P, S = projection_sequence(spec, ins["P"], ins["S"], ins["u"], ins["beta"],
                                                       ins["eta_bias"], ins["alpha_bias"], 0.7, chunk, scale)
        return (k, v, eta, alpha, P) + ((S,) if S is not None else ())
    leaves = {k: v for k, v in ins.items() if v is not None}
    _check(stacked, lambda: _projection_one_by_one(spec, ins, chunk, 0.7, scale), leaves)


def test_projection_sequence_rejects_mlp_memories():
    with pytest.raises(ValueError, match="stacks linear projection memories"):
        projection_sequence(MemorySpec(kind="mlp"), None, None, torch.zeros(1, 2, 3), None, None, None, 1.0, 2)


def _segments(T, chunk, starts):
    """Per chunk: True where a document starts (``starts`` are chunk indices)."""
    n = -(-T // chunk)
    flags = torch.zeros(n, dtype=torch.bool)
    flags[list(starts)] = True
    return flags


@pytest.mark.parametrize("kind,rule,grad_at,momentum,self_targets", [
    ("mlp", "gd", "chunk_start", True, True), ("mlp", "dgd", "chunk_start", False, False),
    ("linear", "gd", "running", True, False), ("linear", "dgd", "chunk_start", True, True)])
def test_resets_restart_documents(kind, rule, grad_at, momentum, self_targets):
    """A row whose chunk 2 restarts gives, from there on, exactly what the document run alone gives;
    a row without resets is untouched; gradients reach the initial state from both documents."""
    spec = MemorySpec(kind=kind, rule=rule, grad_at=grad_at, momentum=momentum)
    C, T = 4, 14                                    # documents: chunks 0-1 and chunks 2-3 (short)
    ins = memory_inputs(spec, N=2, T=T, d=4, dtype=DT, seed=5)
    resets = torch.stack([_segments(T, C, [2]), _segments(T, C, [])])

    def packed():
        r, st, mo = memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"], ins["alpha"],
                                    ins["beta"], ins["q"], C, self_targets=self_targets, resets=resets)
        return (r,) + tuple(st) + (tuple(mo) if mo is not None else ())

    def alone():
        whole = memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"], ins["alpha"],
                                ins["beta"], ins["q"], C, self_targets=self_targets, impl="reference")
        sl = slice(2 * C, T)
        tail = memory_sequence(spec, ins["state"], ins["mom"], ins["k"][:, sl], ins["vhat"][:, sl], ins["eta"][:, sl],
                               ins["alpha"][:, sl], ins["beta"], ins["q"][:, sl], C, self_targets=self_targets,
                               impl="reference")
        r = torch.stack([torch.cat([whole[0][0, :2 * C], tail[0][0]]), whole[0][1]])
        st = tuple(torch.stack([a[0], b[1]]) for a, b in zip(tail[1], whole[1]))
        mo = tuple(torch.stack([a[0], b[1]]) for a, b in zip(tail[2], whole[2])) if momentum else ()
        return (r,) + st + mo
    _check(packed, alone, flat_inputs(ins))


@pytest.mark.parametrize("momentum", [True, False])
def test_projection_resets_restart_documents(momentum):
    spec = MemorySpec(kind="linear", rule="gd", loss="l2", grad_at="running", momentum=momentum)
    C, T = 3, 10
    ins = _projection_inputs(N=2, T=T, dh=3, momentum=momentum)
    resets = torch.stack([_segments(T, C, [2]), _segments(T, C, [])])
    args = lambda u: (spec, ins["P"], ins["S"], u, ins["beta"], ins["eta_bias"], ins["alpha_bias"], 0.7, C)  # noqa: E731

    def packed():
        (k, v, e, a), P, S = projection_sequence(*args(ins["u"]), resets=resets)
        return (k, v, e, a, P) + ((S,) if S is not None else ())

    def alone():
        whole = projection_sequence(*args(ins["u"]))
        tail = projection_sequence(*args(ins["u"][:, 2 * C:]))
        outs = tuple(torch.stack([torch.cat([w[0, :2 * C], t[0]]), w[1]]) for w, t in zip(whole[0], tail[0]))
        P = torch.stack([tail[1][0], whole[1][1]])
        S = (torch.stack([tail[2][0], whole[2][1]]),) if momentum else ()
        return outs + (P,) + S
    _check(packed, alone, {k: v for k, v in ins.items() if v is not None})
