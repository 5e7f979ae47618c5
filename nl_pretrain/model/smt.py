"""Self-modifying Titans (SMT), the sequence mixer of HOPE (paper §8; docs/MODEL.md §2, D2-D12).

Per head: static projections ``u = x W_u`` and ``q = l2norm(silu(conv(x W_q)))``; adaptive
projection memories ``M_k, M_v, M_eta, M_alpha`` produce the keys, values, learning rates and
retention gates from ``u``; every memory learns online from self-generated targets
``vhat_m = M_m(v_t)`` (Eq. 84-85) under the inner loss (Eq. 86 / 92) with the ``dgd`` rule
(Eq. 88) or ``gd``, momentum and decay; the main memory is read with ``q_t`` before token t is
written. The sequence is processed in chunks (§8.2): reads of projection memories and all
gradients inside a chunk use the chunk-start state. Titans and Gated DeltaNet are configurations
of this layer with static projections and plain targets.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.memory import memory_chunk, memory_read, memory_sequence, projection_sequence
from kernels.memory.sequence_torch import restart
from nl_pretrain.model.carry import Carry
from nl_pretrain.model.layers import CausalConv, l2norm
from nl_pretrain.model.memories import MemoryInit, ResolvedImpl, from_rows, make_spec, to_rows
from nl_pretrain.model.sharding import COLUMN, HEADS, ROW

PROJ_MEMORIES = ("k", "v", "eta", "alpha")          # HOPE's adaptive set (the stacked fast path's layout)
PROJECTIONS = ("q", "k", "v", "eta", "alpha")       # every projection that can be an adaptive memory (D21)
ETA_BIAS_INIT, ALPHA_BIAS_INIT, BETA_INIT = -2.0, 4.0, 0.9
BETA_LOGIT = math.log(BETA_INIT / (1 - BETA_INIT))
MATCH_EPS = 1e-6      # proj_target_match: |vhat| + this in the denominator (a zero target stays zero)


class SelfModifyingTitans(nn.Module):
    # heads are independent: projections that produce them are column-parallel, W_o reads them (row),
    # every per-head tensor (biases, betas, output norm, convolution channels, memory states) is sliced
    tp_plan = {**dict.fromkeys(("w_q", "w_u", "w_k", "w_v", "w_g", "w_eta", "w_alpha"), COLUMN), "w_o": ROW,
               **dict.fromkeys(("eta_bias", "alpha_bias", "beta_logit", "out_norm", "conv_q", "conv_u", "conv_k",
                                "conv_v", "proj_init", "main_init"), HEADS)}

    def __init__(self, cfg):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        dh = d // H
        self.cfg, self.d, self.dh = cfg, d, dh
        # which projections are adaptive memories read from u, and which are static projections of x
        # (model.projection_memories, model.retention: the Table 6 switches, docs/MODEL.md D21)
        wanted = cfg.projection_memories if cfg.adaptive_projections else ()
        self.proj_memories = tuple(m for m in PROJECTIONS if m in wanted and (m != "alpha" or cfg.retention))
        self.adaptive = bool(self.proj_memories)
        # +static_k / +static_v (D21): a k or v memory that is not adaptive is the identity on u (k_t = u_t),
        # the static projection the other memories read, so keys stay where reads and targets are taken
        self.identity_maps = tuple(m for m in ("k", "v") if self.adaptive and m not in self.proj_memories)
        self.static = tuple(m for m in PROJECTIONS if m not in self.proj_memories + self.identity_maps
                            and (m != "alpha" or cfg.retention))
        rule, loss, lg, mom = cfg.rule, cfg.inner_loss, cfg.linear_grad, cfg.momentum
        self.proj_spec = make_spec(cfg.proj_memory, rule, loss, lg, mom)
        self.main_spec = make_spec(cfg.main_memory, rule, loss, lg, mom)
        if "q" in self.static:
            self.w_q = nn.Linear(d, H * dh, bias=False)
            self.conv_q = CausalConv(H * dh, cfg.conv_kernel)
        if self.adaptive:
            self.w_u = nn.Linear(d, H * dh, bias=False)
            self.conv_u = CausalConv(H * dh, cfg.conv_kernel)
            e = cfg.memory_expansion
            self.proj_init = nn.ModuleDict({       # q, k, v: d_h -> d_h from the identity; eta, alpha: d_h -> 1
                m: MemoryInit(cfg.proj_memory, H, dh, dh if m in ("q", "k", "v") else 1, e,
                              identity=m in ("q", "k", "v")) for m in self.proj_memories})
        for m in ("k", "v"):
            if m in self.static:
                setattr(self, "w_" + m, nn.Linear(d, H * dh, bias=False))
        for m in ("k", "v"):
            if m in self.static:
                setattr(self, "conv_" + m, CausalConv(H * dh, cfg.conv_kernel))
        for m in ("eta", "alpha"):
            if m in self.static:
                setattr(self, "w_" + m, nn.Linear(d, H, bias=False))
        # static per-head biases of the eta / alpha outputs (retention starts close to 1)
        self.eta_bias = nn.Parameter(torch.full((H,), ETA_BIAS_INIT))
        if cfg.retention:
            self.alpha_bias = nn.Parameter(torch.full((H,), ALPHA_BIAS_INIT))
        self.main_init = MemoryInit(cfg.main_memory, H, dh, dh, cfg.memory_expansion, identity=False)
        n_mem = len(self.proj_memories) + 1
        # momentum beta in (0, 1): a learned scalar per head and per memory (order: proj_memories, mem)
        self.beta_logit = nn.Parameter(torch.full((H, n_mem), BETA_LOGIT))
        self.out_norm = nn.Parameter(torch.ones(H, dh))
        self.w_g = nn.Linear(d, H * dh, bias=False)
        self.w_o = nn.Linear(H * dh, d, bias=False)
        self.impl = ResolvedImpl(cfg.memory_impl)   # memory_impl, resolved once per device

    @property
    def H(self) -> int:
        """Heads this layer holds (all of them, or a tensor-parallel rank's share)."""
        return self.eta_bias.shape[0]

    # -- pieces shared with the sequential reference -------------------------------------------
    def _conv(self, name, x, docs=None, carry=None):
        """``conv_<name>`` over time; with ``carry`` (inference) it continues after the carried inputs."""
        conv = getattr(self, "conv_" + name)
        if carry is None:
            return conv(x, docs)
        y, carry.conv[name] = conv.stream(x, carry.conv[name])
        return y

    def queries(self, x, docs=None, carry=None):
        return l2norm(to_rows(F.silu(self._conv("q", self.w_q(x), docs, carry)), self.H))

    def inputs(self, x, docs=None, carry=None):
        """Adaptive: rows of ``u``. Static: rows of ``(k, v, eta, alpha)``."""
        if self.adaptive:
            # u is l2-normalised (like q): reads of the projection memories stay bounded by their
            # state, which the self-referential targets M(M_v(u)) would otherwise amplify (MODEL.md)
            return l2norm(to_rows(F.silu(self._conv("u", self.w_u(x), docs, carry)), self.H))
        p = self.static_inputs(x, docs, carry)
        return p["k"], p["v"], p["eta"], p["alpha"]

    def static_inputs(self, x, docs=None, carry=None):
        """Rows of the static projections among k, v, eta, alpha (``alpha = 1`` without retention)."""
        B, H, out = x.shape[0], self.H, {}
        if "k" in self.static:
            out["k"] = l2norm(to_rows(F.silu(self._conv("k", self.w_k(x), docs, carry)), H))
        if "v" in self.static:
            v = to_rows(F.silu(self._conv("v", self.w_v(x), docs, carry)), H)
            out["v"] = l2norm(v) if self.cfg.value_norm else v   # unit values (docs/MODEL.md, "Stability")
        if "eta" in self.static:
            out["eta"] = self.gate_eta(to_rows(self.w_eta(x), H)[..., 0], B)
        if "alpha" in self.static:
            out["alpha"] = self.gate_alpha(to_rows(self.w_alpha(x), H)[..., 0], B)
        elif not self.cfg.retention:
            out["alpha"] = x.new_ones(B * H, x.shape[1])          # no weight decay: alpha_t = 1
        return out

    def identity_inputs(self, u):
        """``+static_k`` / ``+static_v`` (D21): a k or v memory that is not adaptive is replaced by the
        identity, its initial state without the learned part, and never written: ``k_t = u_t``
        (``v_t = u_t``), the static projection the adaptive memories read and are written against."""
        return {m: u for m in self.identity_maps}

    def _row_bias(self, bias, batch):
        return bias.repeat(batch)[:, None]                   # rows are batch-major: (B*H, 1)

    def gate_eta(self, raw, batch):
        return self.cfg.eta_max * torch.sigmoid(raw + self._row_bias(self.eta_bias, batch))

    def gate_alpha(self, raw, batch):
        return torch.sigmoid(raw + self._row_bias(self.alpha_bias, batch))

    def chunk_eta(self, spec, eta, chunk):
        """The learning rate a memory sees: scaled by ``mlp_eta_scale`` for MLP memories, and
        ``/ C`` when its gradients are taken at the chunk start and ``eta_chunk_mean`` is on (C steps
        from one frozen gradient would otherwise overshoot; see docs/MODEL.md, "Stability")."""
        if spec.kind == "mlp":
            eta = eta * self.cfg.mlp_eta_scale
        if self.cfg.eta_chunk_mean and spec.grad_at == "chunk_start":
            return eta / chunk
        return eta

    def betas(self, batch):
        """``(n_mem, B*H)``: momentum coefficient of each memory for every row."""
        return torch.sigmoid(self.beta_logit).t().repeat(1, batch)

    def initial(self, batch):
        states = {"mem": self.main_init.expand(batch)}
        if self.adaptive:
            states.update({m: self.proj_init[m].expand(batch) for m in self.proj_memories})
        moms = {m: (tuple(torch.zeros_like(w) for w in s) if self.cfg.momentum else None)
                for m, s in states.items()}
        return states, moms

    def project(self, states, u, batch):
        """Reads of the adaptive projection memories at their chunk-start states: ``{name: rows}``
        (q and k l2-normalised, eta and alpha through their gates)."""
        out = {}
        for m in self.proj_memories:
            r = memory_read(self.proj_spec, states[m], u)
            out[m] = (l2norm(r) if m in ("q", "k") else self.gate_eta(r[..., 0], batch) if m == "eta"
                      else self.gate_alpha(r[..., 0], batch) if m == "alpha" else r)
        return out

    def target(self, spec, ref_state, v, k=None):
        """Self-generated target ``vhat = M_ref(v / |v|)`` (Eq. 84-85) or the plain target ``v``.

        The value is l2-normalised before the memory reads it: with raw ``v`` a memory's gain is
        multiplied by ``|v|`` every chunk and the eta/alpha memories run off to +-inf (MODEL.md).
        With ``proj_target_match`` (projection memories, given their write key ``k``) the target is
        rescaled to the norm of the read at the key, ``|M_ref(k)| vhat / |vhat|``: the write turns the
        read at ``k`` towards ``vhat`` without making it longer (docs/MODEL.md, "+static_k")."""
        if not self.cfg.self_targets:
            return v
        vhat = memory_read(spec, ref_state, l2norm(v))
        if k is not None and self.cfg.proj_target_match:
            at_k = memory_read(spec, ref_state, k).norm(dim=-1, keepdim=True)
            vhat = vhat * (at_k / (vhat.norm(dim=-1, keepdim=True) + MATCH_EPS))
        return vhat

    def output(self, o_rows, x):
        """Per-head RMSNorm, output gate ``sigmoid(x W_g)`` and ``W_o``."""
        B = x.shape[0]
        o = o_rows * torch.rsqrt(o_rows.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        o = o * self.out_norm.repeat(B, 1)[:, None, :]
        return self.w_o(from_rows(o, B) * torch.sigmoid(self.w_g(x)))

    def proj_eta_scale(self, chunk):
        """``chunk_eta`` of the projection memories as one factor (they are linear)."""
        grad_at = self.proj_spec.grad_at
        return 1.0 / chunk if (self.cfg.eta_chunk_mean and grad_at == "chunk_start") else 1.0

    @property
    def doc_alignment(self) -> int:
        """Packed documents start at multiples of this (every chunk boundary stays in place)."""
        a, b = self.cfg.chunk_mem, self.cfg.chunk_proj if self.adaptive else 1
        return a * b // math.gcd(a, b)

    def initial_carry(self, batch: int) -> Carry:
        """The state of a sequence start: learned initial memories, zero momentum, zero conv inputs."""
        states, moms = self.initial(batch)
        convs = {n[len("conv_"):]: m for n, m in self.named_children() if n.startswith("conv_")}
        ref = self.out_norm
        return Carry(states, moms, {n: ref.new_zeros(batch, c.kernel - 1, c.weight.shape[0])
                                    for n, c in convs.items()})

    # -- chunk-parallel forward -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, docs=None, carry: Carry = None):
        """``docs``: packed-document layout (convolutions masked, memories restarted at documents).
        ``carry`` (inference; :mod:`nl_pretrain.model.carry`): start from this state instead of the
        learned initial one and return ``(output, final state)``."""
        B = x.shape[0]
        impl = self.impl(x.device)
        states, moms = self.initial(B) if carry is None else (dict(carry.states), dict(carry.moms))
        out = None if carry is None else Carry(states, moms, dict(carry.conv))
        betas = self.betas(B)
        q = self.queries(x, docs, out) if "q" in self.static else None
        if not self.adaptive:
            k, v, eta, alpha = self.inputs(x, docs, out)
        elif self.proj_memories == PROJ_MEMORIES and self.proj_spec.kind == "linear" and not self.cfg.proj_target_match:
            k, v, eta, alpha = self._stacked_projection_pass(self.inputs(x, docs, out), states, moms, betas, B, impl,
                                                             docs)
        else:
            u = self.inputs(x, docs, out)
            fixed = {**self.static_inputs(x, docs, out), **self.identity_inputs(u)}
            if q is not None:
                fixed["q"] = q
            r = self._projection_pass(u, fixed, states, moms, betas, B, impl, docs)
            q, k, v, eta, alpha = (r[n] for n in PROJECTIONS)
        spec, C = self.main_spec, self.cfg.chunk_mem
        beta = betas[-1] if self.cfg.momentum else None
        o, states["mem"], moms["mem"] = memory_sequence(
            spec, states["mem"], moms["mem"], k, v, self.chunk_eta(spec, eta, C), alpha, beta, q, C,
            self_targets=self.cfg.self_targets, impl=impl, resets=docs.resets(C, self.H) if docs is not None else None,
            recompute=self.cfg.recompute_chunks)
        y = self.output(o, x)
        return y if carry is None else (y, out)

    def _stacked_projection_pass(self, u, states, moms, betas, batch, impl, docs=None):
        """The four linear projection memories as one stacked memory ``[P_k; P_v; P_eta; P_alpha]``
        over the whole sequence (they share keys, learning rates and retention; see
        :func:`kernels.memory.sequence_torch.projection_sequence`): one call, no chunk loop here."""
        P = torch.cat([states[m][0] for m in PROJ_MEMORIES], 1)
        S = torch.cat([moms[m][0] for m in PROJ_MEMORIES], 1) if self.cfg.momentum else None
        beta = betas[:len(PROJ_MEMORIES)].t() if self.cfg.momentum else None
        C = self.cfg.chunk_proj
        (k, v, eta, alpha), P, S = projection_sequence(
            self.proj_spec, P, S, u, beta, self._row_bias(self.eta_bias, batch)[:, 0],
            self._row_bias(self.alpha_bias, batch)[:, 0], self.cfg.eta_max, C, self.proj_eta_scale(C), impl=impl,
            resets=docs.resets(C, self.H) if docs is not None else None, recompute=self.cfg.recompute_chunks)
        sizes = [states[m][0].shape[1] for m in PROJ_MEMORIES]      # final states back per memory (inference)
        S_parts = S.split(sizes, 1) if S is not None else [None] * len(sizes)
        for m, Pm, Sm in zip(PROJ_MEMORIES, P.split(sizes, 1), S_parts):
            states[m], moms[m] = (Pm,), ((Sm,) if self.cfg.momentum else None)
        return k, v, eta, alpha

    def _projection_pass(self, u, fixed, states, moms, betas, batch, impl, docs=None):
        """The adaptive projection memories one at a time, in chunks of ``chunk_proj`` (MLP memories,
        or any set other than HOPE's four linear ones): reads at the chunk-start states, the static
        projections ``fixed`` (full-sequence rows) for the rest; every memory is written with the
        chunk's keys, learning rates and retention. Returns ``{q, k, v, eta, alpha}`` rows."""
        T, C, spec = u.shape[1], self.cfg.chunk_proj, self.proj_spec
        resets = docs.resets(C, self.H) if docs is not None else None
        init = {m: (states[m], moms[m]) for m in self.proj_memories}
        pieces = []
        for j, s in enumerate(range(0, T, C)):
            e = min(s + C, T)
            if resets is not None and j > 0:
                for m in self.proj_memories:
                    states[m], moms[m] = restart(resets[:, j], init[m], (states[m], moms[m]))
            r = self.project(states, u[:, s:e], batch)
            r.update({n: t[:, s:e] for n, t in fixed.items()})
            eta_m = self.chunk_eta(spec, r["eta"], C)
            for i, m in enumerate(self.proj_memories):
                vhat = self.target(spec, states[m], r["v"], r["k"])
                beta = betas[i] if self.cfg.momentum else None
                _, states[m], moms[m] = memory_chunk(spec, states[m], moms[m], r["k"], vhat, eta_m, r["alpha"], beta,
                                                     None, impl=impl)
            pieces.append(r)
        return {n: torch.cat([p[n] for p in pieces], 1) for n in PROJECTIONS}
