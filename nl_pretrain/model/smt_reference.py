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


def _one(spec, state, z):
    return memory_read(spec, state, z[:, None])[:, 0]


def smt_sequential(layer, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    cfg = layer.cfg
    states, moms = layer.initial(B)
    betas = layer.betas(B)
    fixed = layer.static_inputs(x)                      # static projections (all of them for Titans / GDN)
    if "q" in layer.static:
        fixed["q"] = layer.queries(x)
    u = layer.inputs(x) if layer.adaptive else None
    if layer.adaptive:
        fixed.update(layer.identity_inputs(u))            # +static_k / +static_v: k_t = u_t (v_t = u_t)
    ref = {}
    outs = []
    for t in range(T):
        p = {n: z[:, t] for n, z in fixed.items()}
        if layer.adaptive:
            if t % cfg.chunk_proj == 0:
                ref.update({m: states[m] for m in layer.proj_memories})
            spec = layer.proj_spec
            for m in layer.proj_memories:                # reads at the chunk-start state
                r = _one(spec, ref[m], u[:, t])
                p[m] = (l2norm(r) if m in ("q", "k") else layer.gate_eta(r, B)[:, 0] if m == "eta"
                        else layer.gate_alpha(r, B)[:, 0] if m == "alpha" else r)
            for i, m in enumerate(layer.proj_memories):
                vhat = layer.target(spec, ref[m], p["v"][:, None], p["k"][:, None])[:, 0]
                at = states[m] if spec.grad_at == "running" else ref[m]
                step = inner_grad(spec, at, p["k"], vhat)
                beta = betas[i] if cfg.momentum else None
                eta_m = layer.chunk_eta(spec, p["eta"], cfg.chunk_proj)
                states[m], moms[m] = write(spec, states[m], moms[m], step, p["k"], eta_m, p["alpha"], beta)
        k, v, eta, alpha, q = (p[n] for n in ("k", "v", "eta", "alpha", "q"))
        spec = layer.main_spec
        if t % cfg.chunk_mem == 0:
            ref["mem"] = states["mem"]
        outs.append(_one(spec, states["mem"], q))          # read before the write
        vhat = _one(spec, ref["mem"], l2norm(v)) if cfg.self_targets else v
        at = states["mem"] if spec.grad_at == "running" else ref["mem"]
        step = inner_grad(spec, at, k, vhat)
        beta = betas[-1] if cfg.momentum else None
        eta_m = layer.chunk_eta(spec, eta, cfg.chunk_mem)
        states["mem"], moms["mem"] = write(spec, states["mem"], moms["mem"], step, k, eta_m, alpha, beta)
    return layer.output(torch.stack(outs, 1), x)
