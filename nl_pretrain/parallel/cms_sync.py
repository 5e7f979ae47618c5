"""CMS step levels across data-parallel ranks (paper Eq. 71; docs/MODEL.md D14, docs/PARALLEL.md).

A step level of period k > 1 lives outside the DeepSpeed engine: :class:`StepLevelSync` replaces it
in its block by a parameterless :class:`HiddenLevel` that still runs it, so neither ZeRO (stages
1, 2, 3), the bf16 optimizer nor the pipeline engine ever sees (partitions, casts, all-reduces) its
parameters. Their gradients accumulate in ``p.grad`` over the micro-batches of a step; at the end of
the step :meth:`StepLevelSync.step` adds them to the level's local accumulator (no communication);
on the level's update step, and only then, the accumulator is all-reduced over the data-parallel
group, clipped by its own norm (over all blocks and all tensor/pipeline shards) and applied by the
level's own AdamW. The phases are :func:`nl_pretrain.optim.optimizer.auto_phases`, so levels sync on
different steps. Same schedule as the single-process :class:`~nl_pretrain.optim.optimizer.ModelOptimizer`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from nl_pretrain.model.cms import StepLevel
from nl_pretrain.optim.optimizer import _param_groups, auto_phases


class HiddenLevel(nn.Module):
    """Runs a step level that is not a registered submodule (its parameters stay invisible to
    ``module.parameters()``, hence to DeepSpeed). Under a bf16 engine the level keeps fp32 weights
    and computes in bf16 through autocast, as the single-process bf16 path does."""

    def __init__(self, level: StepLevel):
        super().__init__()
        object.__setattr__(self, "level", level)      # not registered: no parameters here

    def forward(self, z: torch.Tensor, docs=None) -> torch.Tensor:
        weight = self.level.mlp.w_up.weight
        if z.dtype != weight.dtype:
            with torch.autocast(z.device.type, dtype=z.dtype):
                return self.level(z).to(z.dtype)
        return self.level(z)


def slow_levels(blocks: Iterable[Tuple[int, nn.Module]]) -> Dict[int, List[tuple]]:
    """``{level index: [(global name, parameter), ...]}`` of the step levels with period > 1 in the
    given ``(block index, block)`` pairs."""
    out: Dict[int, List[tuple]] = {}
    for b, block in blocks:
        for j, level in enumerate(block.levels):
            lvl = level.level if isinstance(level, HiddenLevel) else level
            if isinstance(lvl, StepLevel) and lvl.period > 1:
                out.setdefault(j, []).extend(
                    (f"blocks.{b}.levels.{j}.{n.replace('.inner.', '.')}", p) for n, p in lvl.named_parameters())
    return out


def model_parallel_norm(params: List[torch.Tensor], group) -> torch.Tensor:
    """The 2-norm of the gradients of ``params`` over every tensor/pipeline shard: sharded tensors
    count on every rank, replicated ones on tensor rank 0 only."""
    tp_rank = 0
    if group is not None:
        from megatron.core import parallel_state as ps
        tp_rank = ps.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().float().norm().cpu() ** 2
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


class StepLevelSync:
    """The slow step levels of the given blocks (this rank's pipeline stage), hidden from DeepSpeed.

    ``dp_group``: where accumulators are all-reduced; ``norm_group``: where the clipping norm is summed
    (the model-parallel group: tensor x pipeline), ``None`` in one process.
    """

    def __init__(self, blocks: List[Tuple[int, nn.Module]], optim_cfg, cms_levels, dp_group=None, norm_group=None):
        self.cfg, self.group, self.norm_group = optim_cfg, dp_group, norm_group
        periods = [lvl.period if lvl.kind == "step" else 1 for lvl in cms_levels]
        auto = auto_phases(periods)
        self.periods = periods
        self.phases = [lvl.phase if lvl.phase >= 0 else auto[i] for i, lvl in enumerate(cms_levels)]
        self.levels = {}
        self.comm_log: List[tuple] = []             # (step, level, bytes): every collective issued
        self.updates = {}                           # level -> number of updates applied
        for i, named in sorted(slow_levels(blocks).items()):
            params = [p for _, p in named]
            opt = torch.optim.AdamW(_param_groups(named, optim_cfg.weight_decay, cms_levels[i].lr_scale),
                                    lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
            self.levels[i] = {"named": named, "params": params, "acc": [torch.zeros_like(p) for p in params],
                              "opt": opt}
            self.updates[i] = 0
        for _, block in blocks:                     # hide them from the engine
            for j, level in enumerate(block.levels):
                if isinstance(level, StepLevel) and level.period > 1:
                    block.levels[j] = HiddenLevel(level)

    def parameter_ids(self) -> set:
        return {id(p) for lv in self.levels.values() for p in lv["params"]}

    def named_parameters(self) -> List[tuple]:
        return [np for lv in self.levels.values() for np in lv["named"]]

    def updates_at(self, level: int, step: int) -> bool:
        k = self.periods[level]
        return (step - self.phases[level]) % k == k - 1

    def discard_step(self) -> None:
        """Drop this step's gradients (a skipped step): accumulators keep their earlier steps."""
        for lv in self.levels.values():
            for p in lv["params"]:
                p.grad = None

    def step(self, step: int, lr: float) -> List[int]:
        """Add this step's gradients to the accumulators; sync and apply the levels due at ``step``
        (returns their indices)."""
        for lv in self.levels.values():             # Eq. 71: sum over the k steps, locally
            for p, a in zip(lv["params"], lv["acc"]):
                if p.grad is not None:
                    a.add_(p.grad)
                    p.grad = None
        due = [i for i in self.levels if self.updates_at(i, step)]
        world = dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
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
            norm = model_parallel_norm(lv["params"], self.norm_group)
            coef = limit / (float(norm) + 1e-6)
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
