"""Token-by-token reference of :class:`SelfModifyingTitans` (readable, float64-capable).

It shares the layer's parameters and its position-wise pieces (projections, convolution, output)
but walks the sequence one token at a time: at a chunk boundary it snapshots ``M_ref``; for each
token it reads the projection memories at ``M_ref``, forms the targets, takes each inner gradient
(written out in :mod:`kernels.memory.naive`) and writes. Tests compare the chunk-parallel forward
against it; the CPU benchmark uses it as the baseline.
"""
from __future__ import annotations

import torch

from kernels.memory import memory_read
from kernels.memory.naive import inner_grad, write
from nl_pretrain.model.layers import l2norm
from nl_pretrain.model.smt import PROJ_MEMORIES


def _one(spec, state, z):
    return memory_read(spec, state, z[:, None])[:, 0]


def smt_sequential(layer, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    cfg = layer.cfg
    states, moms = layer.initial(B)
    betas = layer.betas(B)
    q = layer.queries(x)
    inp = layer.inputs(x)
    ref = {}
    outs = []
    for t in range(T):
        if layer.adaptive:
            if t % cfg.chunk_proj == 0:
                ref.update({m: states[m] for m in PROJ_MEMORIES})
            u = inp[:, t]
            spec = layer.proj_spec
            k = _one(spec, ref["k"], u)
            k = l2norm(k)
            v = _one(spec, ref["v"], u)
            eta = layer.gate_eta(_one(spec, ref["eta"], u), B)[:, 0]
            alpha = layer.gate_alpha(_one(spec, ref["alpha"], u), B)[:, 0]
            for i, m in enumerate(PROJ_MEMORIES):
                vhat = _one(spec, ref[m], l2norm(v)) if cfg.self_targets else v
                at = states[m] if spec.grad_at == "running" else ref[m]
                step = inner_grad(spec, at, k, vhat)
                beta = betas[i] if cfg.momentum else None
                eta_m = layer.chunk_eta(spec, eta, cfg.chunk_proj)
                states[m], moms[m] = write(spec, states[m], moms[m], step, k, eta_m, alpha, beta)
        else:
            k, v, eta, alpha = (z[:, t] for z in inp)
        spec = layer.main_spec
        if t % cfg.chunk_mem == 0:
            ref["mem"] = states["mem"]
        outs.append(_one(spec, states["mem"], q[:, t]))          # read before the write
        vhat = _one(spec, ref["mem"], l2norm(v)) if cfg.self_targets else v
        at = states["mem"] if spec.grad_at == "running" else ref["mem"]
        step = inner_grad(spec, at, k, vhat)
        beta = betas[-1] if cfg.momentum else None
        eta_m = layer.chunk_eta(spec, eta, cfg.chunk_mem)
        states["mem"], moms["mem"] = write(spec, states["mem"], moms["mem"], step, k, eta_m, alpha, beta)
    return layer.output(torch.stack(outs, 1), x)
