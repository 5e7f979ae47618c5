"""Pipeline parallelism: the language model as a DeepSpeed ``PipelineModule``.

The layer list is ``[embedding, blocks of stage 0, ..., blocks of stage P-1, final norm, head]`` and
the partition is fixed (not balanced by DeepSpeed): stage s runs the blocks
:func:`~nl_pretrain.parallel.topology.stage_layers` gives it, the first stage also the embedding,
the last also the final norm, the head and the loss. With tied embeddings the embedding and the
head are one ``TiedLayerSpec``: DeepSpeed keeps the copy on the first and on the last stage equal
and sums their gradients.

Between stages travels ``(hidden (B, T, d), doc_ids (B, T))`` in the packed layout, so every
micro-batch has the same shapes; each stage unpacks the documents into rows for its blocks and packs
them again (:mod:`nl_pretrain.model.packing`), which is exact because blocks act row by row.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from nl_pretrain.model.packing import run_documents


class StageBlocks(nn.Module):
    """The blocks of one pipeline stage, applied to the packed hidden state."""

    def __init__(self, blocks: List[nn.Module], bf16: bool = False):
        super().__init__()
        self.blocks, self.bf16 = nn.ModuleList(blocks), bf16

    def forward(self, inputs):
        x, doc_ids = inputs
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = run_documents(self.blocks, x, doc_ids)
        return x.to(torch.bfloat16) if self.bf16 else x, doc_ids


class FinalNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        x, doc_ids = inputs
        return self.norm(x), doc_ids


class Wrapped(nn.Module):
    """An already-built module under a ``LayerSpec``/``TiedLayerSpec`` (which build from a class)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _embed(wrapped: Wrapped, inputs):
    ids, doc_ids = inputs
    return wrapped.module(ids), doc_ids


def _head(wrapped: Wrapped, inputs, tensor_parallel: int):
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
    h, _ = inputs
    weight = wrapped.module.weight
    if tensor_parallel > 1:
        h = copy_to_tensor_model_parallel_region(h)        # backward: all-reduce over TP
    return (h @ weight.t()).float()                          # (B, T, V / TP)


class _Head:
    """Picklable ``forward_fn`` for the head (a closure over the tensor-parallel size)."""

    def __init__(self, tensor_parallel: int):
        self.tp = tensor_parallel

    def __call__(self, wrapped, inputs):
        return _head(wrapped, inputs, self.tp)


class PipelineLoss:
    """Next-token loss on the last stage: (vocab-parallel) cross entropy summed over the labelled
    tokens and divided by the count the data side computed (global micro-batch count / DP)."""

    def __init__(self, tensor_parallel: int):
        self.tp = tensor_parallel

    def __call__(self, logits, labels):
        labels, count = labels
        mask = labels != -100
        if self.tp > 1:
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
            losses = vocab_parallel_cross_entropy(logits, labels.clamp_min(0))
        else:
            losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1),
                                                 reduction="none").view_as(labels)
        return (losses * mask).sum() / count


def build_pipeline(model, layout, stage_blocks: List[List[int]], bf16: bool = False):
    """The DeepSpeed ``PipelineModule`` of ``model`` (already tensor-parallel); ``stage_blocks[s]``
    lists the block indices of stage s. Must be called on every rank (it creates process groups)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tp = layout.tp
    layers = []
    if model.lm_head is None:
        layers.append(TiedLayerSpec("embed", Wrapped, model.embed, forward_fn=_embed,
                                    tied_weight_attr=["module.weight"]))
    else:
        layers.append(LayerSpec(_EmbedLayer, model.embed))
    layers += [StageBlocks([model.blocks[i] for i in ids], bf16) for ids in stage_blocks]
    layers.append(FinalNorm(model.norm))
    if model.lm_head is None:
        layers.append(TiedLayerSpec("embed", Wrapped, model.embed, forward_fn=_Head(tp),
                                    tied_weight_attr=["module.weight"]))
    else:
        layers.append(LayerSpec(_HeadLayer, model.lm_head, tp))
    pp = len(stage_blocks)
    parts = [0] + [s + 2 for s in range(pp - 1)] + [len(layers)]
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=layout.tp, num_dp=layout.dp)
    module = _FixedPartitionPipeline(parts, layers=layers, topology=topo, loss_fn=PipelineLoss(tp),
                                     partition_method="uniform", activation_checkpoint_interval=0)
    _count_once_in_norm(module)
    return module


def _count_once_in_norm(module) -> None:
    """DeepSpeed's gradient norm sums over the model-parallel group (tensor x pipeline) but counts a
    parameter without a model-parallel mark on model-parallel rank 0 only, so every stage but the
    first would drop out of the clipping norm. Mark this stage's parameters as owned here, except
    tensor-replicated ones on tensor ranks > 0 (counted by tensor rank 0) and the tied copies
    DeepSpeed flags ``ds_pipe_replicated`` (counted on the first stage of the tie)."""
    from megatron.core import parallel_state as ps
    tp_rank = ps.get_tensor_model_parallel_rank()
    for p in module.parameters():
        if getattr(p, "ds_pipe_replicated", False):
            # the tied copy on a later stage: counted where the tie starts (its engine's clip with
            # ZeRO 0 ignores the flag, so drop every mark it would count)
            p.model_parallel = False
            p.tensor_model_parallel = False
        elif not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = tp_rank == 0


class _EmbedLayer(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        ids, doc_ids = inputs
        return self.embed(ids), doc_ids


class _HeadLayer(nn.Module):
    def __init__(self, lm_head, tensor_parallel: int):
        super().__init__()
        self.lm_head, self.tp = lm_head, tensor_parallel

    def forward(self, inputs):
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
        h, _ = inputs
        if self.tp > 1:
            h = copy_to_tensor_model_parallel_region(h)
        return self.lm_head(h).float()


def _fixed_partition_class():
    from deepspeed.pipe import PipelineModule

    class FixedPartitionPipeline(PipelineModule):
        """``PipelineModule`` with an explicit partition (layer boundaries per stage)."""

        def __init__(self, parts, **kwargs):
            self._fixed_parts = parts
            super().__init__(**kwargs)

        def _partition_layers(self, method="uniform"):
            self.parts = list(self._fixed_parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return FixedPartitionPipeline


def _FixedPartitionPipeline(parts, **kwargs):
    return _fixed_partition_class()(parts, **kwargs)
