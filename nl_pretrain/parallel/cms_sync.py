"""CMS step levels across data-parallel ranks (paper Eq. 71; docs/MODEL.md D14, docs/PARALLEL.md).

A step level of period k > 1 lives outside the DeepSpeed engine: :class:`StepLevelSync` replaces it
in its block by a parameterless :class:`HiddenLevel` that still runs it, so neither ZeRO (stages
1, 2, 3), the bf16 optimizer nor the pipeline engine ever sees (partitions, casts, all-reduces) its
parameters. Their gradients accumulate in ``p.grad`` over the micro-batches of a step; at the end of
the step :meth:`StepLevelSync.step` adds them to the level's local accumulator (no communication);
on the level's update step, and only then, the accumulator is all-reduced over the data-parallel
group, clipped by its own norm (over all blocks and all tensor/pipeline shards) and applied by the
level's own optimizer (``optim.name``). The schedule itself is
:class:`nl_pretrain.optim.optimizer.SlowLevels`, the one the single-process
:class:`~nl_pretrain.optim.optimizer.ModelOptimizer` uses: levels sync on different steps.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from nl_pretrain.model.cms import StepLevel
from nl_pretrain.optim.optimizer import SlowLevels


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
    The schedule is :class:`~nl_pretrain.optim.optimizer.SlowLevels` (as in one process); this adds
    the DP all-reduce of a due level's accumulator and the clipping norm over every model-parallel shard.

    ``dp_group``: where accumulators are all-reduced; ``norm_group``: where the clipping norm is summed
    (the model-parallel group: tensor x pipeline), ``None`` in one process; ``partition_state``: the
    matrix rules keep each matrix's state on one DP rank, which broadcasts the update.
    """

    def __init__(self, blocks: List[Tuple[int, nn.Module]], optim_cfg, cms_levels, dp_group=None, norm_group=None,
                 partition_state: bool = False):
        self.cfg, self.group, self.norm_group = optim_cfg, dp_group, norm_group
        # partition_state (ZeRO 1/2/3): each matrix's optimizer state on one DP rank (optim/rules.py)
        self.schedule = SlowLevels(slow_levels(blocks), optim_cfg, cms_levels,
                                   dp_group if partition_state and dp_group is not None else None)
        self.levels, self.updates = self.schedule.levels, self.schedule.updates
        self.periods, self.phases = self.schedule.periods, self.schedule.phases
        self.comm_log: List[tuple] = []             # (step, level, bytes): every collective issued
        for _, block in blocks:                     # hide them from the engine
            for j, level in enumerate(block.levels):
                if isinstance(level, StepLevel) and level.period > 1:
                    block.levels[j] = HiddenLevel(level)

    def parameter_ids(self) -> set:
        return {id(p) for lv in self.levels.values() for p in lv["params"]}

    def named_parameters(self) -> List[tuple]:
        return [np for lv in self.levels.values() for np in lv["named"]]

    def updates_at(self, level: int, step: int) -> bool:
        return self.schedule.updates_at(level, step)

    def discard_step(self) -> None:
        """Drop this step's gradients (a skipped step): accumulators keep their earlier steps."""
        self.schedule.discard_step()

    def step(self, step: int, lr: float) -> List[int]:
        """Add this step's gradients to the accumulators; sync and apply the levels due at ``step``
        (returns their indices)."""
        world = dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1

        def reduce(i, accs):
            if world == 1:
                return
            flat = torch.cat([a.reshape(-1) for a in accs])
            dist.all_reduce(flat, group=self.group)
            self.comm_log.append((step, i, flat.numel() * flat.element_size()))
            flat /= world
            offset = 0
            for a in accs:
                a.copy_(flat[offset:offset + a.numel()].view_as(a))
                offset += a.numel()

        return self.schedule.step(step, lr, reduce, lambda params: model_parallel_norm(params, self.norm_group))
