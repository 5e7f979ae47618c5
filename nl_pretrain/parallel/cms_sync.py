"""CMS step levels across data-parallel ranks (paper Eq. 71; DESIGN.md §4.3).

A step level of period k > 1 lives outside the DeepSpeed optimizer. A post-accumulate-grad hook
moves each gradient into the level's local accumulator as soon as autograd writes it, so DeepSpeed
never sees (and never all-reduces) it; on the level's update step, and only then, the accumulator
is all-reduced over the data-parallel group, clipped, and applied by the level's own AdamW. The
phases are :func:`nl_pretrain.optim.optimizer.auto_phases`, so levels sync on different steps.
Same schedule as the single-process :class:`~nl_pretrain.optim.optimizer.ModelOptimizer`.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn

from nl_pretrain.model.cms import StepLevel
from nl_pretrain.optim.optimizer import _param_groups, auto_phases


def slow_level_parameters(model: nn.Module) -> Dict[int, List[tuple]]:
    """``{level index: [(name, parameter), ...]}`` of step levels with period > 1 (all blocks)."""
    out: Dict[int, List[tuple]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, StepLevel) and mod.period > 1:
            idx = int(name.rsplit(".", 1)[-1])
            out.setdefault(idx, []).extend((f"{name}.{n}", p) for n, p in mod.named_parameters())
    return out


class StepLevelSync:
    def __init__(self, model: nn.Module, optim_cfg, cms_levels, dp_group=None):
        self.cfg, self.group = optim_cfg, dp_group
        periods = [lvl.period if lvl.kind == "step" else 1 for lvl in cms_levels]
        auto = auto_phases(periods)
        self.periods = periods
        self.phases = [lvl.phase if lvl.phase >= 0 else auto[i] for i, lvl in enumerate(cms_levels)]
        self.levels = {}
        self.comm_log: List[tuple] = []             # (step, level, bytes): every collective issued
        for i, named in sorted(slow_level_parameters(model).items()):
            params = [p for _, p in named]
            acc = [torch.zeros_like(p) for p in params]
            for p, a in zip(params, acc):
                p.register_post_accumulate_grad_hook(self._mover(a))
            opt = torch.optim.AdamW(_param_groups(named, optim_cfg.weight_decay, cms_levels[i].lr_scale),
                                    lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
            self.levels[i] = {"params": params, "acc": acc, "opt": opt}

    @staticmethod
    def _mover(acc: torch.Tensor):
        def hook(p):
            acc.add_(p.grad)        # local accumulation: no communication (Eq. 71 sums)
            p.grad = None
        return hook

    def parameter_ids(self) -> set:
        return {id(p) for lv in self.levels.values() for p in lv["params"]}

    def updates_at(self, level: int, step: int) -> bool:
        k = self.periods[level]
        return (step - self.phases[level]) % k == k - 1

    def step(self, step: int, lr: float) -> List[int]:
        """Sync and apply the levels due at ``step``; returns their indices."""
        due = [i for i in self.levels if self.updates_at(i, step)]
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        for i in due:
            lv = self.levels[i]
            if world > 1:
                flat = torch.cat([a.reshape(-1) for a in lv["acc"]])
                dist.all_reduce(flat, group=self.group)
                self.comm_log.append((step, i, flat.numel() * flat.element_size()))
                flat /= world
                offset = 0
                for a in lv["acc"]:
                    a.copy_(flat[offset:offset + a.numel()].view_as(a))
                    offset += a.numel()
            for p, a in zip(lv["params"], lv["acc"]):
                p.grad = a.clone()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(lv["params"], self.cfg.grad_clip)
            for g in lv["opt"].param_groups:
                g["lr"] = lr * g["lr_scale"]
            lv["opt"].step()
            for p, a in zip(lv["params"], lv["acc"]):
                a.zero_()
                p.grad = None
        return due

    def state_dict(self) -> dict:
        return {"levels": {i: {"opt": lv["opt"].state_dict(), "acc": [a.clone() for a in lv["acc"]]}
                           for i, lv in self.levels.items()},
                "periods": list(self.periods), "phases": list(self.phases)}

    def load_state_dict(self, state: dict) -> None:
        if state["periods"] != self.periods or state["phases"] != self.phases:
            raise ValueError(f"CMS step levels differ from the checkpoint: periods/phases "
                             f"{self.periods}/{self.phases} vs {state['periods']}/{state['phases']}")
        for i, lv in self.levels.items():
            lv["opt"].load_state_dict(state["levels"][i]["opt"])
            for a, saved in zip(lv["acc"], state["levels"][i]["acc"]):
                a.copy_(saved)
