"""The Nested Learning outer optimizers for weight matrices: Muon, M3, delta momentum, DMGD
(docs/MODEL.md, "Outer optimizers"), and AdamW for every other tensor, in one ``torch.optim.Optimizer``.

Every group has a ``rule``: ``adamw`` (elementwise; any tensor, also a ZeRO flat partition) or one of
the matrix rules, whose group holds exactly one 2-D weight matrix and describes it (``nl_name``,
``nl_shape`` = this rank's tensor-parallel shard, ``nl_full_shape`` = the whole matrix, ``nl_tp_dim``
= the dimension it is split along or None). Groups of different rules may be mixed (a CMS step level
with its own optimizer). A matrix rule works on the whole matrix: it gathers the tensor-parallel
shards of whatever it orthogonalises or multiplies (:class:`Shards`).

*Partitioned state* (``dp_group`` given: the DeepSpeed engine hands the optimizer flat data-parallel
partitions of fp32 master weights, under ZeRO 1/2/3, fp32 or bf16). Each matrix has one owner among the data-parallel
ranks (greedy by size, the same on every rank): the ranks send their gradient partitions to the
owner (``gather``), the owner rebuilds the (tensor shard of the) matrix, runs the rule with the only
copy of its state and sends every rank its partition of the update (``scatter``); every rank applies
its partition to its fp32 master partition. A rank thus keeps the state of the matrices it owns
only (about 1/DP of it) and computes 1/DP of the Newton-Schulz work. Without ``dp_group`` (one
process, ZeRO 0 (fp32, or bf16 with DeepSpeed's whole fp32 master copies)) every rank keeps all
state. The slow CMS levels (outside the engine, whole matrices, gradients all-reduced on their update
steps) get ``dp_group`` under ZeRO 1/2/3 too: the owner runs the rule and broadcasts the update.

Newton-Schulz uses the widely published quintic coefficients (3.4445, -4.7750, 2.0315) of Keller
Jordan's Muon; ``scale="rms"`` is Moonlight's ``0.2 * sqrt(max(m, n))`` (update RMS ~ AdamW's, so the
run's ``optim.lr`` serves both), ``scale="shape"`` is ``sqrt(max(1, m / n))``.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, List, Optional

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)
MATRIX_RULES = ("muon", "m3", "delta_momentum", "dmgd")

# per-parameter state each rule keeps (what checkpoint records carry besides "value"); keys starting
# with "rep:" are whole-matrix tensors replicated over tensor-parallel ranks (never sliced)
STATE_KEYS = {
    "adamw": ("exp_avg", "exp_avg_sq"),
    "muon": ("momentum",),
    "delta_momentum": ("momentum",),
    "m3": ("m1", "m2", "v", "slow_acc", "o2"),
    "dmgd": ("rep:w1", "rep:w2"),
}


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately the orthogonal factor U V^T of ``g = U S V^T`` (quintic iteration, Frobenius-normalised
    start). Computes in float32 (float64 stays float64)."""
    x = g.double() if g.dtype == torch.float64 else g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


def shape_scale(shape, kind: str) -> float:
    m, n = shape
    if kind == "rms":
        return 0.2 * math.sqrt(max(m, n))
    if kind == "shape":
        return math.sqrt(max(1.0, m / n))
    return 1.0


class Shards:
    """Whole-matrix view of this rank's tensor-parallel shard (identity in one process)."""

    def __init__(self, dim: Optional[int]):
        self.dim, self.world, self.group, self.rank = dim, 1, None, 0
        if dim is not None:
            from megatron.core import parallel_state as ps
            if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
                self.world = ps.get_tensor_model_parallel_world_size()
                self.group = ps.get_tensor_model_parallel_group()
                self.rank = ps.get_tensor_model_parallel_rank()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, self.dim)

    def slice(self, full: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return full
        return full.chunk(self.world, self.dim)[self.rank].contiguous()


def dmgd_init(name: str, out: int, n: int, hidden: int, dtype, device, seed: int = 0):
    """DMGD memory of one matrix: W1 (h x n) with orthonormal rows (a seeded QR, the same on every
    rank and independent of the run's random streams), W2 = W1^T; h = min(hidden, out, n)."""
    h = max(1, min(hidden, out, n))
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    q, _ = torch.linalg.qr(torch.randn(n, h, generator=gen, dtype=torch.float64))
    w1 = q.T.contiguous().to(dtype=dtype, device=device)
    return w1, w1.T.contiguous().clone()


def dmgd_memory_step(w1, w2, keys, lr: float, decay: float):
    """One online step of the memory on ``keys`` (rows): internal loss 1/(2 rows) sum ||W2 tanh(W1 k) - k||^2,
    ``theta <- decay * theta - lr * grad``. Returns (the loss before the step, new w1, new w2)."""
    rows = keys.shape[0]
    a = torch.tanh(keys @ w1.T)                       # rows x h
    e = a @ w2.T - keys                               # rows x n
    loss = 0.5 * float((e * e).sum()) / rows
    g2 = e.T @ a / rows                               # n x h
    g1 = ((e @ w2) * (1 - a * a)).T @ keys / rows     # h x n
    return loss, decay * w1 - lr * g1, decay * w2 - lr * g2


def dmgd_read(w1, w2, keys):
    return torch.tanh(keys @ w1.T) @ w2.T


class NLOptimizer(torch.optim.Optimizer):
    """AdamW groups and matrix-rule groups (see the module docstring); ``cfg`` is the run's ``optim``
    section (its ``muon``/``m3``/``delta_momentum``/``dmgd`` subsections); ``dp_group``: partition the
    matrices' state over this data-parallel group (the engine's flat partitions)."""

    def __init__(self, groups: List[dict], cfg, dp_group=None):
        self.cfg = cfg
        super().__init__(groups, dict(lr=cfg.lr, weight_decay=0.0, lr_scale=1.0, rule="adamw"))
        self.inner_losses: Dict[str, List[float]] = {}      # DMGD: internal loss per matrix, per step
        self.keys: Dict[str, torch.Tensor] = {}             # nl_name -> the tensor its state is keyed by
        self.dp_group, self.dp_world, self.dp_rank = dp_group, 1, 0
        if dp_group is not None:
            import torch.distributed as dist
            self.dp_world, self.dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
            load = [0] * self.dp_world
            mats = [g for g in self.param_groups if g["rule"] != "adamw"]
            for g in sorted(mats, key=lambda g: -math.prod(g["nl_shape"])):    # stable: ties keep group order
                owner = min(range(self.dp_world), key=lambda r: load[r])
                g["nl_owner"] = owner
                load[owner] += math.prod(g["nl_shape"])

    # ---------------------------------------------------------------------------------- state
    def state_keys(self, group) -> tuple:
        return STATE_KEYS[group["rule"]]

    def owns(self, group) -> bool:
        """Whether this rank keeps (and computes) the state of a matrix group."""
        return group.get("nl_owner") is None or group["nl_owner"] == self.dp_rank

    def state_shapes(self, group) -> Dict[str, tuple]:
        if group["rule"] == "dmgd":
            out, n = group["nl_full_shape"]
            h = max(1, min(self.cfg.dmgd.hidden, out, n))
            return {"rep:w1": (h, n), "rep:w2": (n, h)}
        return {k: tuple(group["nl_shape"]) for k in STATE_KEYS[group["rule"]]}

    def fresh_state(self, group, p) -> dict:
        rule = group["rule"]
        st = {"step": torch.tensor(0.0)}
        if rule != "adamw" and not self.owns(group):
            return st                                    # another data-parallel rank keeps it
        if rule == "dmgd":
            out, n = group["nl_full_shape"]
            w1, w2 = dmgd_init(group["nl_name"], out, n, self.cfg.dmgd.hidden, p.dtype, p.device, self.cfg.dmgd.seed)
            st["rep:w1"], st["rep:w2"] = w1, w2
            return st
        shape = group.get("nl_shape", tuple(p.shape)) if rule != "adamw" else tuple(p.shape)
        for k in STATE_KEYS[rule]:
            st[k] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return st

    def init_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if group["rule"] != "adamw":
                    self.keys[group["nl_name"]] = p
                if not self.state.get(p):
                    self.state[p] = self.fresh_state(group, p)

    def bind(self, name: str, key: torch.Tensor) -> None:
        """The tensor a matrix group's state is keyed by, where the group's ``params`` are not always
        set (ZeRO-3 sets them only around each sub-group's step)."""
        self.keys[name] = key

    def _state_of(self, group) -> tuple:
        key = group["params"][0] if group["params"] else self.keys.get(group["nl_name"])
        if key is None:
            raise RuntimeError(f"{group['nl_name']}: the optimizer has not seen this matrix's partition yet")
        if not self.state.get(key):
            self.state[key] = self.fresh_state(group, key)
        return key, self.state[key]

    def read_matrix(self, group) -> Dict[str, torch.Tensor]:
        """A matrix group's state as fp32 CPU tensors on every data-parallel rank (collective when the
        state is partitioned: the owner broadcasts it)."""
        key, st = self._state_of(group)
        out = {}
        for k, shape in self.state_shapes(group).items():
            t = st[k].detach().float() if self.owns(group) else torch.empty(shape, dtype=torch.float32, device=key.device)
            if group.get("nl_owner") is not None and self.dp_world > 1:
                import torch.distributed as dist
                t = t.contiguous()
                dist.broadcast(t, src=dist.get_global_rank(self.dp_group, group["nl_owner"]), group=self.dp_group)
            out[k] = t.cpu().clone()
        return out

    def write_matrix(self, group, rec: Dict[str, torch.Tensor]) -> None:
        """A matrix group's state from a record (every rank gets the whole record; the owner keeps it);
        a key the record lacks (a checkpoint of another optimizer) starts fresh."""
        key, st = self._state_of(group)
        if not self.owns(group):
            return
        fresh = self.fresh_state(group, key)
        for k in self.state_keys(group):
            st[k] = (rec[k] if k in rec else fresh[k]).to(device=key.device, dtype=key.dtype).clone()

    # ---------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state.get(p):
                    self.state[p] = self.fresh_state(group, p)
                st = self.state[p]
                st["step"] += 1
                if group["rule"] == "adamw":
                    self._adamw(group, p, st)
                else:
                    self._matrix(group, p, st)
        return loss

    def _adamw(self, group, p, st) -> None:
        c, lr, t = self.cfg, group["lr"], float(st["step"])
        g = p.grad
        p.mul_(1 - lr * group["weight_decay"])
        st["exp_avg"].lerp_(g, 1 - c.beta1)
        st["exp_avg_sq"].mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - c.beta2 ** t)).add_(c.eps)
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - c.beta1 ** t))

    def _matrix(self, group, p, st) -> None:
        self.keys[group["nl_name"]] = p
        if group.get("nl_owner") is not None:
            return self._matrix_owned(group, p, st)
        if tuple(p.shape) != tuple(group["nl_shape"]):
            raise RuntimeError(f"{group['nl_name']}: got a flat partition {tuple(p.shape)} of a "
                               f"{tuple(group['nl_shape'])} matrix; build the optimizer with dp_group= (ZeRO)")
        u = getattr(self, "_" + group["rule"])(group, st, p.grad, Shards(group.get("nl_tp_dim")))
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(u.to(p.dtype), alpha=-lr)

    def _matrix_owned(self, group, p, st) -> None:
        """Partitioned state: gather the gradient partitions on the owner, which runs the rule and
        scatters the update's partitions (module docstring). A whole matrix (a slow CMS level: its
        gradient is already all-reduced on every rank): the owner runs the rule and broadcasts the update."""
        import torch.distributed as dist
        shape, part, owner = tuple(group["nl_shape"]), p.numel(), group["nl_owner"]
        mine = owner == self.dp_rank
        src = dist.get_global_rank(self.dp_group, owner) if self.dp_world > 1 else None
        if tuple(p.shape) == shape:
            u = (getattr(self, "_" + group["rule"])(group, st, p.grad, Shards(group.get("nl_tp_dim"))).to(p.dtype)
                 if mine else torch.empty_like(p))
            if self.dp_world > 1:
                u = u.contiguous()
                dist.broadcast(u, src=src, group=self.dp_group)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(u, alpha=-group["lr"])
            return
        grad = p.grad.contiguous()
        parts = [torch.empty_like(grad) for _ in range(self.dp_world)] if mine else None
        if self.dp_world > 1:
            dist.gather(grad, parts, dst=src, group=self.dp_group)
        else:
            parts = [grad]
        pieces = None
        if mine:
            g = torch.cat(parts)[:math.prod(shape)].view(shape)
            u = getattr(self, "_" + group["rule"])(group, st, g, Shards(group.get("nl_tp_dim")))
            flat = u.reshape(-1).to(p.dtype)
            flat = torch.cat([flat, flat.new_zeros(part * self.dp_world - flat.numel())])
            pieces = list(flat.split(part))
        if self.dp_world > 1:
            piece = torch.empty_like(grad)
            dist.scatter(piece, pieces, src=src, group=self.dp_group)
        else:
            piece = pieces[0]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(piece, alpha=-lr)

    def _orth(self, m_local, shards, steps, scale) -> torch.Tensor:
        full = shards.gather(m_local)
        return shards.slice(newton_schulz(full, steps)) * shape_scale(tuple(full.shape), scale)

    def _muon(self, group, st, g, shards):
        c = self.cfg.muon
        buf = st["momentum"]
        buf.lerp_(g, 1 - c.momentum)
        m = g.lerp(buf, c.momentum) if c.nesterov else buf
        return self._orth(m, shards, c.ns_steps, c.scale)

    def _delta_momentum(self, group, st, g, shards):
        c = self.cfg.delta_momentum
        gf, mf = shards.gather(g), shards.gather(st["momentum"])
        sq = float((gf * gf).sum())
        if sq > 0:   # M (alpha I - G^T G / ||G||_F^2) + G, associated on the cheaper side
            decay = (mf @ gf.T) @ gf if gf.shape[0] <= gf.shape[1] else mf @ (gf.T @ gf)
            mf = c.alpha * mf - decay / sq + gf
        else:
            mf = c.alpha * mf
        st["momentum"].copy_(shards.slice(mf))
        if c.orthogonalize:
            return shards.slice(newton_schulz(mf, c.ns_steps)) * shape_scale(tuple(mf.shape), c.scale)
        return st["momentum"]

    def _m3(self, group, st, g, shards):
        c = self.cfg.m3
        t = int(st["step"])
        if c.variant == "printed":               # Algorithm 1 as printed: sums, no decay
            st["m1"].add_(g, alpha=c.beta1)
            st["v"].addcmul_(g, g, value=c.beta2)
            v = st["v"]
        else:                                    # decaying: EMAs, V bias-corrected
            st["m1"].lerp_(g, 1 - c.beta1)
            st["v"].mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
            v = st["v"] / (1 - c.beta2 ** t)
        st["slow_acc"].add_(g)
        o1 = self._orth(st["m1"], shards, c.ns_steps, "none")
        u = (o1 + c.alpha * st["o2"]) / (v.sqrt() + c.eps)
        if c.scale == "rms":                     # the printed direction at AdamW's update RMS (0.2)
            full_sq = _shard_sum(u * u, shards)
            u = u * (0.2 / math.sqrt(full_sq / math.prod(group["nl_full_shape"]) + 1e-30))
        elif c.scale == "shape":
            u = u * shape_scale(tuple(group["nl_full_shape"]), "shape")
        if t % c.frequency == 0:                 # the slow momentum: once every f steps, for the next f
            if c.variant == "printed":
                st["m2"].add_(st["slow_acc"], alpha=c.beta3)
            else:
                st["m2"].lerp_(st["slow_acc"], 1 - c.beta3)
            st["slow_acc"].zero_()
            st["o2"].copy_(self._orth(st["m2"], shards, c.ns_steps, "none"))
        return u

    def _dmgd(self, group, st, g, shards):
        c = self.cfg.dmgd
        gf = shards.gather(g)
        s = float(gf.pow(2).mean().sqrt()) + 1e-30
        keys = gf / s
        loss, w1, w2 = dmgd_memory_step(st["rep:w1"], st["rep:w2"], keys, c.lr, c.decay)
        st["rep:w1"].copy_(w1)
        st["rep:w2"].copy_(w2)
        self.inner_losses.setdefault(group["nl_name"], []).append(loss)
        d = dmgd_read(w1, w2, keys) * s
        if c.orthogonalize:
            return shards.slice(newton_schulz(d, c.ns_steps)) * shape_scale(tuple(d.shape), c.scale)
        return shards.slice(d)


def _shard_sum(t: torch.Tensor, shards: Shards) -> float:
    """Sum of ``t`` over the whole matrix (all tensor-parallel shards)."""
    total = t.sum()
    if shards.world > 1:
        import torch.distributed as dist
        total = total.clone()
        dist.all_reduce(total, group=shards.group)
    return float(total)
