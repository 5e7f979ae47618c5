"""The TP x PP x DP layout: checked before any work starts, then built with megatron-core.

Rank order is megatron-core's ``tp-cp-ep-dp-pp`` (tensor fastest, then data, then pipeline), which is
also DeepSpeed's ``PipeModelDataParallelTopology`` order (model, data, pipe): global rank
``r = tp_rank + TP * (dp_rank + DP * pp_rank)``. Every refusal names the numbers and the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from nl_pretrain.config import ConfigError


class LayoutError(ConfigError):
    pass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int        # sequences per rank per micro-step
    grad_accum: int         # micro-steps per optimizer step

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def describe(self) -> str:
        return (f"world {self.world} = tensor {self.tp} x pipeline {self.pp} x data {self.dp}; ZeRO stage "
                f"{self.zero_stage}; global batch {self.global_batch} = micro {self.micro_batch} x accum "
                f"{self.grad_accum} x data {self.dp}")


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Contiguous, equal split of the blocks over pipeline stages (checked divisible)."""
    per = n_layers // pp
    return range(stage * per, (stage + 1) * per)


def step_hidden(d_model: int, expansion: float) -> int:
    return max(1, int(round(expansion * d_model)))     # as nl_pretrain.model.cms.StepLevel


def check_layout(cfg, world_size: int, global_batch: Optional[int] = None) -> Layout:
    """Validate ``cfg.parallel`` against the model, the batch and ``world_size``; return the layout."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    tp, pp = p.tensor, p.pipeline
    errors: List[str] = []
    if world_size % (tp * pp):
        errors.append(f"world size ({world_size}) must divide by parallel.tensor ({tp}) x parallel.pipeline "
                      f"({pp}) = {tp * pp}; launch a multiple of {tp * pp} processes or change the layout")
    dp = max(1, world_size // (tp * pp))
    if m.n_heads % tp:
        errors.append(f"model.n_heads ({m.n_heads}) must divide by parallel.tensor ({tp}); "
                      f"use a tensor size among {_divisors(m.n_heads)}")
    if m.vocab_size % tp:
        pad = -(-m.vocab_size // tp) * tp
        errors.append(f"model.vocab_size ({m.vocab_size}) must divide by parallel.tensor ({tp}); "
                      f"pad it with --model.vocab_size={pad}")
    for i, lvl in enumerate(m.cms):
        if lvl.kind == "step" and step_hidden(m.d_model, lvl.expansion) % tp:
            h = step_hidden(m.d_model, lvl.expansion)
            errors.append(f"model.cms[{i}] step level hidden width ({h} = {lvl.expansion} x {m.d_model}) must "
                          f"divide by parallel.tensor ({tp}); change model.cms[{i}].expansion")
    if m.n_layers % pp:
        errors.append(f"model.n_layers ({m.n_layers}) must divide by parallel.pipeline ({pp}); "
                      f"use a pipeline size among {_divisors(m.n_layers)}")
    if pp > 1 and p.zero_stage > 1:
        errors.append(f"parallel.zero_stage ({p.zero_stage}) with parallel.pipeline ({pp}) > 1: DeepSpeed's "
                      f"pipeline engine supports ZeRO stage 0 or 1 only; use --parallel.zero_stage=1")
    if pp > 1 and t.grad_accum < pp:
        errors.append(f"train.grad_accum ({t.grad_accum}) < parallel.pipeline ({pp}): the pipeline needs at "
                      f"least one micro-batch per stage in flight; use --train.grad_accum={pp} or more")
    if global_batch is not None:
        per = t.micro_batch_size * dp
        if global_batch % per:
            errors.append(f"global batch ({global_batch}) must divide by train.micro_batch_size "
                          f"({t.micro_batch_size}) x data parallel ({dp}) = {per}; use a multiple of {per}")
        elif global_batch // per != t.grad_accum:
            errors.append(f"global batch ({global_batch}) = micro {t.micro_batch_size} x data {dp} x accum "
                          f"{global_batch // per}, but train.grad_accum is {t.grad_accum}; "
                          f"set --train.grad_accum={global_batch // per}")
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    return Layout(tp, pp, dp, p.zero_stage, t.micro_batch_size, t.grad_accum)


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


# -- building it --------------------------------------------------------------------------------------
def init_parallel(cfg, backend: Optional[str] = None) -> Layout:
    """Start the process group (env:// from torchrun, the DeepSpeed launcher, Ray or srun), check the
    layout, and build megatron-core's TP / PP / DP groups."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    import deepspeed
    # plain gloo on CPU: the shared-memory comm op would JIT-compile for ~50 s (measured on our CPU machines)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():            # Ray Train starts the group itself
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend=backend)
    layout = check_layout(cfg, dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                                 pipeline_model_parallel_size=layout.pp)
    return layout


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


class DeepSpeedMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state``.

    DeepSpeed's "model parallel" (gradient-norm reduction, replicated-parameter de-duplication) is the
    tensor-parallel group; its pipeline engine builds the pipeline groups from its own topology,
    which uses the same rank order.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps
        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()
