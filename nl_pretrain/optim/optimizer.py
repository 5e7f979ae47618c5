"""Outer optimizers (one builder keyed by ``optim.name``), warmup + cosine decay, and the CMS step-level
schedule (Eq. 71), written once for one process and for the distributed engine.

:func:`build_optimizer` turns ``(name, parameter)`` pairs into the optimizer ``optim.name`` asks for:
``adamw`` is ``torch.optim.AdamW``; ``muon``, ``m3``, ``delta_momentum`` and ``dmgd`` are
:class:`~nl_pretrain.optim.rules.NLOptimizer` with the rule on every weight matrix
(:func:`param_role`) and AdamW on every other tensor. The single-process :class:`ModelOptimizer`,
the engine's client optimizer (``parallel/parallelize.py``) and every slow step level use it.

Parameters of CMS step levels with ``period`` k > 1 do not change every step (:class:`SlowLevels`):
their gradients are summed over k optimizer steps into an accumulator and applied once, by an
optimizer of their own with the level's learning-rate scale, on the steps where
``(step - phase) % k == k - 1``. Levels get staggered phases so their updates (and, distributed,
their all-reduces) fall on different steps. The accumulators and phases are part of the state.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn

from nl_pretrain.model.cms import StepLevel


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` then cosine decay to ``cfg.lr * min_lr_ratio`` at the last step."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def auto_phases(periods: List[int]) -> List[int]:
    """Stagger levels with period > 1: the j-th of n slow levels starts at ``j * k // n``."""
    slow = [i for i, k in enumerate(periods) if k > 1]
    phases = [0] * len(periods)
    for j, i in enumerate(slow):
        phases[i] = (j * periods[i]) // len(slow)
    return phases


NO_DECAY = ("init", "embed", "out_norm", "beta_logit")


def _shape(p) -> tuple:
    """A parameter's shape, also when ZeRO-3 has already partitioned it (its data then empty)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _param_groups(params: List[tuple], weight_decay: float, lr_scale: float = 1.0) -> List[dict]:
    # decay matrices of linear maps only: not learned initial states, embeddings, or the per-head
    # (2-D but norm- or gate-like) out_norm and beta_logit
    decay = [p for n, p in params if len(_shape(p)) >= 2 and not any(s in n for s in NO_DECAY)]
    ids = {id(p) for p in decay}
    rest = [p for n, p in params if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
              {"params": rest, "weight_decay": 0.0, "lr_scale": lr_scale}]
    return [g for g in groups if g["params"]]


MATRIX_EXCLUDE = NO_DECAY + ("lm_head",)


def param_role(name: str, p, optim_name: str) -> str:
    """``matrix`` (the optimizer's own rule) or ``adamw``: embeddings, the output head, norms, gains,
    biases, learned initial states, per-head norm/gate tables and every tensor that is not 2-D."""
    if optim_name == "adamw":
        return "adamw"
    if len(_shape(p)) == 2 and not any(s in name for s in MATRIX_EXCLUDE):
        return "matrix"
    return "adamw"


def _tp_dim(p):
    return getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None


def level_rule(cms_levels, index: int, optim_cfg) -> str:
    """The optimizer of CMS level ``index``: its own ``optimizer`` or the run's ``optim.name``."""
    return getattr(cms_levels[index], "optimizer", "") or optim_cfg.name


def uses_nl_optimizer(optim_cfg, cms_levels=()) -> bool:
    """Whether any parameter gets a matrix rule (then the optimizers are :class:`NLOptimizer`)."""
    names = {optim_cfg.name} | {level_rule(cms_levels, i, optim_cfg) for i, lvl in enumerate(cms_levels)
                                if lvl.kind == "step"}
    return names != {"adamw"}


def optimizer_groups(named: List[tuple], cfg, lr_scale: float = 1.0, rule: str = "") -> List[dict]:
    """Parameter groups of optimizer ``rule`` (default ``optim.name``) for one learning-rate scale."""
    rule = rule or cfg.name
    if rule == "adamw":
        return [dict(g, rule="adamw") for g in _param_groups(named, cfg.weight_decay, lr_scale)]
    mats = [(n, p) for n, p in named if param_role(n, p, rule) == "matrix"]
    ids = {id(p) for _, p in mats}
    groups = [dict(g, rule="adamw") for g in _param_groups([(n, p) for n, p in named if id(p) not in ids],
                                                           cfg.weight_decay, lr_scale)]
    for n, p in mats:
        dim = _tp_dim(p)
        full = list(_shape(p))
        if dim is not None:
            from nl_pretrain.parallel.tensor import tensor_parallel_size
            full[dim] *= tensor_parallel_size()
        groups.append({"params": [p], "rule": rule, "weight_decay": cfg.weight_decay, "lr_scale": lr_scale,
                       "nl_name": n, "nl_shape": _shape(p), "nl_full_shape": tuple(full), "nl_tp_dim": dim})
    return groups


def step_level_of(model: nn.Module) -> Dict[int, int]:
    """``id(parameter) -> CMS level index`` for the parameters of every registered :class:`StepLevel`."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, StepLevel):
            index = int(name.rsplit(".", 1)[-1])                # blocks.<b>.levels.<i>
            out.update({id(p): index for p in mod.parameters()})
    return out


def every_step_groups(named: List[tuple], level_of: Dict[int, int], cfg, cms_levels) -> List[dict]:
    """Groups of the every-step parameters: ``optim.name`` for the model, and groups of their own for
    each period-1 step level with an ``lr_scale`` or an ``optimizer`` of its own (one process and the
    engine alike)."""
    def own(i):
        return cms_levels[i].lr_scale != 1.0 or level_rule(cms_levels, i, cfg) != cfg.name
    special = {id(p): level_of[id(p)] for _, p in named if id(p) in level_of and own(level_of[id(p)])}
    groups = optimizer_groups([(n, p) for n, p in named if id(p) not in special], cfg)
    for i in sorted(set(special.values())):
        mine = [(n, p) for n, p in named if special.get(id(p)) == i]
        groups += optimizer_groups(mine, cfg, cms_levels[i].lr_scale, level_rule(cms_levels, i, cfg))
    return groups


def build_optimizer(groups: List[dict], cfg, dp_group=None) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` when every group is AdamW's, else :class:`~nl_pretrain.optim.rules.NLOptimizer`
    (each group its own rule). ``dp_group``: the engine hands the optimizer flat data-parallel partitions
    (ZeRO 1/2/3, bf16); each matrix's state then lives on one data-parallel rank only (``rules.py``,
    "Partitioned state")."""
    if all(g.get("rule", "adamw") == "adamw" for g in groups):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    from nl_pretrain.optim.rules import NLOptimizer
    return NLOptimizer(groups, cfg, dp_group)


def clip_coefficient(norm: float, limit: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s factor: ``limit / (norm + 1e-6)`` when below 1."""
    return min(1.0, limit / (float(norm) + 1e-6))


class SlowLevels:
    """Eq. 71 for the slow CMS step levels of one model or one pipeline stage: ``{level: [(name, p)]}``.

    ``step(step, lr, reduce, norm)`` adds this step's gradients to the accumulators; for each level due
    it calls ``reduce(level, accumulators)`` (distributed: the DP all-reduce; may be None), clips the
    sum by ``norm(params)`` (default: its own 2-norm) and applies the level's own optimizer.
    ``dp_group``: the matrix rules keep each matrix's state on one data-parallel rank (``rules.py``)."""

    def __init__(self, named_by_level: Dict[int, List[tuple]], optim_cfg, cms_levels, dp_group=None):
        self.cfg = optim_cfg
        periods = [lvl.period if lvl.kind == "step" else 1 for lvl in cms_levels]
        auto = auto_phases(periods)
        self.phases = [lvl.phase if lvl.phase >= 0 else auto[i] for i, lvl in enumerate(cms_levels)]
        self.periods = periods
        self.levels: Dict[int, dict] = {}
        self.updates: Dict[int, int] = {}
        for i, named in sorted(named_by_level.items()):
            params = [p for _, p in named]
            opt = build_optimizer(optimizer_groups(named, optim_cfg, cms_levels[i].lr_scale,
                                                   level_rule(cms_levels, i, optim_cfg)), optim_cfg, dp_group)
            self.levels[i] = {"named": named, "params": params, "acc": [torch.zeros_like(p) for p in params],
                              "opt": opt}
            self.updates[i] = 0

    def updates_at(self, level: int, step: int) -> bool:
        k = self.periods[level]
        return (step - self.phases[level]) % k == k - 1

    def discard_step(self) -> None:
        for lv in self.levels.values():
            for p in lv["params"]:
                p.grad = None

    def step(self, step: int, lr: float, reduce=None, norm=None) -> List[int]:
        for lv in self.levels.values():                         # Eq. 71: sum over the k steps
            for p, a in zip(lv["params"], lv["acc"]):
                if p.grad is not None:
                    a.add_(p.grad)
                    p.grad = None
        due = [i for i in self.levels if self.updates_at(i, step)]
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        for i in due:
            lv = self.levels[i]
            if reduce is not None:
                reduce(i, lv["acc"])
            for p, a in zip(lv["params"], lv["acc"]):
                p.grad = a.clone()
            if norm is None:
                torch.nn.utils.clip_grad_norm_(lv["params"], limit)
            else:
                coef = clip_coefficient(norm(lv["params"]), limit)
                if coef < 1.0:
                    for p in lv["params"]:
                        p.grad.mul_(coef)
            for g in lv["opt"].param_groups:
                g["lr"] = lr * g["lr_scale"]
            lv["opt"].step()
            self.updates[i] += 1
            for p, a in zip(lv["params"], lv["acc"]):
                a.zero_()
                p.grad = None
        return due


class ModelOptimizer:
    """One process: the ``optim.name`` optimizer for every-step parameters and :class:`SlowLevels`."""

    def __init__(self, model: nn.Module, optim_cfg, cms_levels):
        self.cfg, self.cms_levels = optim_cfg, cms_levels
        slow_names: Dict[int, List[tuple]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, StepLevel) and mod.period > 1:
                level_idx = int(name.rsplit(".", 1)[-1])       # blocks.<b>.levels.<i>
                slow_names.setdefault(level_idx, []).extend((f"{name}.{n}", p) for n, p in mod.named_parameters())
        slow_ids = {id(p) for ps in slow_names.values() for _, p in ps}
        base = [(n, p) for n, p in model.named_parameters() if id(p) not in slow_ids]
        self.base = build_optimizer(every_step_groups(base, step_level_of(model), optim_cfg, cms_levels), optim_cfg)
        self.schedule = SlowLevels(slow_names, optim_cfg, cms_levels)
        self.slow = self.schedule.levels
        self.phases, self.periods = self.schedule.phases, self.schedule.periods

    def updates_at(self, level: int, step: int) -> bool:
        return self.schedule.updates_at(level, step)

    def step(self, step: int, lr: float) -> float:
        """Apply this step's updates; returns the every-step parameters' gradient norm before clipping."""
        # clipping: the every-step parameters by their joint norm, each due slow level by the norm of
        # its own k-step sum (docs/MODEL.md, "Gradient clipping"); the same rule distributed
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        applied = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(applied, limit)
        for g in self.base.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.base.step()
        self.schedule.step(step, lr)
        return float(norm)

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)
        for lv in self.slow.values():
            lv["opt"].zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "base": self.base.state_dict(),
            "slow": {i: {"opt": lv["opt"].state_dict(), "acc": [a.clone() for a in lv["acc"]]}
                     for i, lv in self.slow.items()},
            "phases": list(self.phases),
            "periods": list(self.periods),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["periods"] != self.periods or state["phases"] != self.phases:
            raise ValueError(f"CMS step levels differ from the checkpoint: periods/phases "
                             f"{self.periods}/{self.phases} vs {state['periods']}/{state['phases']}")
        self.base.load_state_dict(state["base"])
        for i, lv in self.slow.items():
            lv["opt"].load_state_dict(state["slow"][i]["opt"])
            for a, saved in zip(lv["acc"], state["slow"][i]["acc"]):
                a.copy_(saved)


def role_summary(model_cfg, optim_cfg) -> List[str]:
    """Lines for ``nl-pretrain info``: which tensors each optimizer's rule gets and which get AdamW
    (CMS step levels with an ``optimizer`` of their own listed by theirs)."""
    import re
    from nl_pretrain.model import LanguageModel
    with torch.device("meta"):
        model = LanguageModel(model_cfg)
    level_of = step_level_of(model)
    by_role: Dict[str, Dict[str, list]] = {}
    for name, p in model.named_parameters():
        rule = level_rule(model_cfg.cms, level_of[id(p)], optim_cfg) if id(p) in level_of else optim_cfg.name
        role = rule if param_role(name, p, rule) == "matrix" else "adamw"
        kind = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        if id(p) in level_of:
            kind = re.sub(r"levels\.\*", f"levels.{level_of[id(p)]}", kind)
        entry = by_role.setdefault(role, {}).setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += p.numel()
    rule = optim_cfg.name
    out = [f"optimizer {rule}" + ("" if rule == "adamw" else ": its rule on 2-D weight matrices, AdamW on the rest")]
    for i, lvl in enumerate(model_cfg.cms):
        if lvl.kind == "step" and level_rule(model_cfg.cms, i, optim_cfg) != rule:
            out.append(f"  CMS level {i} (step, period {lvl.period}): optimizer {lvl.optimizer}, lr x {lvl.lr_scale:g}")
    for role in sorted(by_role, key=lambda r: (r == "adamw", r != rule, r)):
        kinds = by_role[role]
        out.append(f"  {role}: {sum(v[1] for v in kinds.values()):,} parameters in {sum(v[0] for v in kinds.values())} tensors")
        out += [f"    {k} (x{v[0]})" for k, v in sorted(kinds.items())]
    return out
