"""``parallelize``: the single-device model -> this rank's part of a TP x PP x DP job.

Applied from outside the model, always in this order (each step needs the one before):

1. **Tensor parallel, built in place** (:mod:`nl_pretrain.parallel.tensor`,
   :mod:`nl_pretrain.parallel.materialize`): the model arrives on the meta device; this rank
   materialises its shard of every tensor of its pipeline stage as the modules' ``tp_plan`` declares,
   then the stage's replicated tensors; under ZeRO-3 one root (embedding, block, norm, head) at a
   time, each partitioned over DP (``deepspeed.zero.Init(module=...)``) before the next is built.
   First, because everything after sees the local shapes.
2. **Slow CMS step levels out of the engine's sight** (:mod:`nl_pretrain.parallel.cms_sync`): levels
   of period k > 1 are replaced in their blocks by parameterless wrappers, so neither ZeRO nor the
   bf16 optimizer nor the pipeline ever holds them; they keep their own optimizer and sync schedule.
3. **Activation checkpointing**: each of this stage's blocks is wrapped by :class:`Checkpointed`
   (recomputed in the backward). After 2, so the hidden levels are recomputed with their block.
4. **The engine**: the model as a DeepSpeed ``PipelineModule`` (``parallel.pipeline > 1``) or as a
   :class:`LossModule`, with ZeRO-3's external parameters registered, inside ``deepspeed.initialize``
   with the client optimizer of ``optim.name`` (``optim.build_optimizer``, parameter groups as in the
   single-process optimizer), ZeRO over the DP group,
   bf16 and gradient accumulation. Last, because DeepSpeed takes the modules as they are then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn

from nl_pretrain.optim.optimizer import build_optimizer, every_step_groups, step_level_of, uses_nl_optimizer
from nl_pretrain.parallel.materialize import (full_value, held_in_order, held_roots, holds, materialize_held,
                                              partition_zero3)
from nl_pretrain.parallel.cms_sync import StepLevelSync
from nl_pretrain.parallel.tensor import apply_tensor_parallel, parallel_loss
from nl_pretrain.parallel.topology import DeepSpeedMPU, Layout, stage_layers


def deepspeed_config(cfg, layout: Layout) -> dict:
    zero = {"stage": layout.zero_stage}
    if layout.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # the matrix optimizers (one group per matrix; DeepSpeed hands them flat partitions under ZeRO/bf16)
        "zero_allow_untested_optimizer": uses_nl_optimizer(cfg.optim, cfg.model.cms),
    }


class Checkpointed(nn.Module):
    """A block recomputed in the backward (``deepspeed.checkpointing.checkpoint``); plain without grad."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.block(x, docs)
        import deepspeed
        if docs is None:
            return deepspeed.checkpointing.checkpoint(self.block, x)
        return deepspeed.checkpointing.checkpoint(lambda h: self.block(h, docs), x)


class LossModule(nn.Module):
    """What the DeepSpeed engine runs: the language model and its (vocab-parallel) loss."""

    def __init__(self, model: nn.Module, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, input_ids, labels, doc_ids, token_count):
        # bf16 engine: weights are bf16; autocast lines up the dtypes at every matmul while the
        # memory kernels keep their state in fp32 (as in the single-process bf16 path)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return parallel_loss(self.model, input_ids, labels, doc_ids, token_count)


def _zero3_external_parameters(wrapper: LossModule) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; parameters read by a parent's
    forward (memory initial states, the tied output embedding) must be registered with that parent."""
    from deepspeed.runtime.zero import register_external_parameter
    from nl_pretrain.model.cms import ContextLevel
    from nl_pretrain.model.memories import MemoryInit
    from nl_pretrain.model.smt import SelfModifyingTitans
    model = wrapper.model
    for mod in model.modules():
        if isinstance(mod, (SelfModifyingTitans, ContextLevel)):
            for child in mod.modules():
                if isinstance(child, MemoryInit):
                    for p in child.parameters():
                        register_external_parameter(mod, p)
    if model.lm_head is None:
        register_external_parameter(wrapper, model.embed.weight)


def _every_step_groups(model: nn.Module, named: List[tuple], cfg) -> list:
    """Parameter groups as in ModelOptimizer (``optim.every_step_groups``: ``optim.name``, and groups
    of their own for period-1 step levels with their own ``lr_scale`` or ``optimizer``)."""
    return every_step_groups(named, step_level_of(model), cfg.optim, cfg.model.cms)


@dataclass
class Parallelized:
    engine: object                  # the DeepSpeed engine (a PipelineEngine when pipeline > 1)
    slow: StepLevelSync             # slow CMS step levels beside it
    names: Dict[int, str]           # id(parameter) -> its name in the single-device model
    engine_named: List[tuple]       # (name, parameter) of what the engine holds
    block_ids: List[int]            # this pipeline stage's blocks


def parallelize(model: nn.Module, cfg, layout: Layout, device: torch.device,
                zero3_as_built: bool = True) -> Parallelized:
    """Make ``model`` (the single-device model, identical on every rank: built on the meta device, or
    materialised) this rank's part; only this rank's share is materialised. ``zero3_as_built=False``
    (bench/startup_memory.py's baseline): under ZeRO-3 the whole share is built first and the engine
    partitions it."""
    import deepspeed
    from megatron.core import parallel_state as ps
    from nl_pretrain.parallel.random import seed_model_parallel

    stages = [list(stage_layers(cfg.model.n_layers, layout.pp, s)) for s in range(layout.pp)]
    stage = ps.get_pipeline_model_parallel_rank()
    block_ids = stages[stage]
    roots = held_roots(model, layout.pp, stage, block_ids)
    # 1. tensor parallel: this rank's shard of every tensor of its stage (generated in place for a
    #    meta-device model), then its replicated tensors; other stages stay on the meta device.
    #    ZeRO-3: root by root, each partitioned over DP as soon as it is built (peak: the partitions
    #    so far + one root's share, not the whole share)
    zero3 = layout.zero_stage == 3 and zero3_as_built and layout.dp > 1    # over one rank: nothing to split
    mpu3 = DeepSpeedMPU() if zero3 and layout.pp == 1 else None
    for group in ([[r] for r in held_in_order(model, roots)] if zero3 else [roots]):
        apply_tensor_parallel(model, value=full_value(model), keep=holds(group))
        materialize_held(model, group, device)
        if zero3:
            partition_zero3(model, group[0], deepspeed_config(cfg, layout), ps.get_data_parallel_group(), mpu3,
                            bf16=cfg.train.precision == "bf16")
    seed_model_parallel(cfg.train.seed)
    # global parameter names (this rank's tensor-parallel shard of each), whatever wraps them later
    names = {id(p): n.replace(".inner.", ".") for n, p in model.named_parameters()}
    # 2. slow CMS step levels: out of the engine, synced over DP on their own update steps
    norm_group = ps.get_model_parallel_group() if layout.tp * layout.pp > 1 else None
    slow = StepLevelSync([(i, model.blocks[i]) for i in block_ids], cfg.optim, cfg.model.cms,
                         ps.get_data_parallel_group(), norm_group, partition_state=layout.zero_stage >= 1)
    # 3. activation checkpointing: wrap this stage's blocks
    if cfg.parallel.activation_checkpointing:
        for i in block_ids:
            model.blocks[i] = Checkpointed(model.blocks[i])
    # 4. the engine
    bf16 = cfg.train.precision == "bf16"
    if layout.pp > 1:
        from nl_pretrain.parallel.pipeline import build_pipeline
        module, mpu = build_pipeline(model, layout, stages, bf16=bf16), None   # the engine builds its grid
    else:
        module, mpu = LossModule(model, bf16=bf16), DeepSpeedMPU()
        if layout.zero_stage == 3:
            _zero3_external_parameters(module)
    named = [(names[id(p)], p) for p in module.parameters()]
    # ZeRO 1/2/3 (fp32 or bf16) hand the optimizer flat data-parallel partitions: the matrix rules then
    # keep each matrix's state on one data-parallel rank (optim/rules.py, "Partitioned state"); bf16
    # without ZeRO gives it whole fp32 master copies (state replicated, as AdamW's)
    opt = build_optimizer(_every_step_groups(model, named, cfg), cfg.optim,
                          dp_group=ps.get_data_parallel_group() if layout.zero_stage >= 1 else None)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=deepspeed_config(cfg, layout),
                                           mpu=mpu, model_parameters=[p for _, p in named])
    return Parallelized(engine, slow, names, named, block_ids)
