"""Outer optimizer: AdamW with warmup + cosine decay, and the CMS step-level schedule (Eq. 71).

Parameters of CMS step levels with ``period`` k > 1 do not change every step: their gradients are
summed over k optimizer steps into an accumulator and applied once, by an AdamW of their own with
the level's learning-rate scale, on the steps where ``(step - phase) % k == k - 1``. Levels get
staggered phases so their updates (and, distributed, their all-reduces) fall on different steps.
The accumulators and phases are part of :meth:`state_dict`.
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


def _param_groups(params: List[tuple], weight_decay: float, lr_scale: float = 1.0) -> List[dict]:
    # decay matrices of linear maps only: not learned initial states, embeddings, or the per-head
    # (2-D but norm- or gate-like) out_norm and beta_logit
    decay = [p for n, p in params if p.ndim >= 2 and not any(s in n for s in NO_DECAY)]
    ids = {id(p) for p in decay}
    rest = [p for n, p in params if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
              {"params": rest, "weight_decay": 0.0, "lr_scale": lr_scale}]
    return [g for g in groups if g["params"]]


class ModelOptimizer:
    """Wraps one AdamW for every-step parameters and one per slow CMS step level."""

    def __init__(self, model: nn.Module, optim_cfg, cms_levels):
        self.cfg = optim_cfg
        periods = [lvl.period if lvl.kind == "step" else 1 for lvl in cms_levels]
        auto = auto_phases(periods)
        self.phases = [lvl.phase if lvl.phase >= 0 else auto[i] for i, lvl in enumerate(cms_levels)]
        self.periods = periods
        slow_names: Dict[int, List[tuple]] = {}
        scaled: List[tuple] = []
        for name, mod in model.named_modules():
            if isinstance(mod, StepLevel):
                level_idx = int(name.rsplit(".", 1)[-1])       # blocks.<b>.levels.<i>
                named = [(f"{name}.{n}", p) for n, p in mod.named_parameters()]
                if mod.period > 1:
                    slow_names.setdefault(level_idx, []).extend(named)
                elif mod.lr_scale != 1.0:
                    scaled.extend(named)
        slow_ids = {id(p) for ps in slow_names.values() for _, p in ps}
        scaled_ids = {id(p) for _, p in scaled}
        base = [(n, p) for n, p in model.named_parameters() if id(p) not in slow_ids | scaled_ids]
        groups = _param_groups(base, optim_cfg.weight_decay)
        for lvl_idx in sorted({int(n.split(".levels.")[1].split(".")[0]) for n, _ in scaled}):
            mine = [(n, p) for n, p in scaled if f".levels.{lvl_idx}." in n]
            groups += _param_groups(mine, optim_cfg.weight_decay, cms_levels[lvl_idx].lr_scale)
        self.base = self._adamw(groups)
        self.slow = {}
        for i, named in sorted(slow_names.items()):
            params = [p for _, p in named]
            self.slow[i] = {
                "params": params,
                "acc": [torch.zeros_like(p) for p in params],
                "opt": self._adamw(_param_groups(named, optim_cfg.weight_decay, cms_levels[i].lr_scale)),
            }

    def _adamw(self, groups):
        c = self.cfg
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)

    def updates_at(self, level: int, step: int) -> bool:
        k = self.periods[level]
        return (step - self.phases[level]) % k == k - 1

    def step(self, step: int, lr: float) -> float:
        """Apply this step's updates; returns the every-step parameters' gradient norm before clipping."""
        due = []
        for i, lv in self.slow.items():                         # Eq. 71: sum over the k steps
            for p, acc in zip(lv["params"], lv["acc"]):
                if p.grad is not None:
                    acc.add_(p.grad)
                    p.grad = None
            if self.updates_at(i, step):
                due.append(i)
                for p, acc in zip(lv["params"], lv["acc"]):
                    p.grad = acc.clone()
        # clipping: the every-step parameters by their joint norm, each due slow level by the norm of
        # its own k-step sum (docs/MODEL.md, "Gradient clipping"); the same rule distributed
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        applied = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(applied, limit)
        for i in due:
            torch.nn.utils.clip_grad_norm_(self.slow[i]["params"], limit)
        for opt in [self.base] + [self.slow[i]["opt"] for i in due]:
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            opt.step()
        for i in due:
            for p, acc in zip(self.slow[i]["params"], self.slow[i]["acc"]):
                acc.zero_()
                p.grad = None
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
