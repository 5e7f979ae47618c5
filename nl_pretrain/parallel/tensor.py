"""Tensor parallelism applied from outside the model (the model stays single-device math).

Every rank builds the full single-device model from the same seed, then :func:`apply_tensor_parallel`
keeps this rank's slice: projections that produce heads become megatron-core ``ColumnParallelLinear``
(output channels are head-major, so a contiguous slice is a contiguous block of heads), the
projections that read heads become ``RowParallelLinear``, per-head parameters (learned initial
states of the fast-weight memories, momentum betas, gate biases, output norms, depthwise
convolution channels) are sliced by head, and the embedding becomes ``VocabParallelEmbedding``.
A head's fast-weight memory is updated entirely on the rank that owns the head: no communication
inside the inner loop. CMS context levels read this rank's head slice of ``z``
(``local_heads``); step levels are column -> row parallel SwiGLUs.

:func:`shard_plan` says how each parameter is split; the dry run counts per-rank parameters with it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from nl_pretrain.model.attention import Attention
from nl_pretrain.model.cms import ContextLevel, StepLevel
from nl_pretrain.model.smt import SelfModifyingTitans

# how a parameter is split across tensor-parallel ranks: (style, dim); style None = replicated
COLUMN, ROW, HEADS, VOCAB = "column", "row", "heads", "vocab"
_COLUMN = {SelfModifyingTitans: ("w_q", "w_u", "w_k", "w_v", "w_g", "w_eta", "w_alpha"),
           Attention: ("w_q", "w_k", "w_v"),
           ContextLevel: ("w_target", "w_eta", "w_alpha")}
_ROW = {SelfModifyingTitans: ("w_o",), Attention: ("w_o",), ContextLevel: ("w_o",)}
_HEAD_PARAMS = ("eta_bias", "alpha_bias", "beta_logit", "out_norm")
_HEAD_CHILDREN = ("conv_q", "conv_u", "conv_k", "conv_v", "proj_init", "main_init", "init")


def shard_plan(model: nn.Module) -> Dict[str, Tuple[str, int]]:
    """``{parameter name: (style, dim)}`` for every tensor-parallel parameter; others are replicated."""
    plan: Dict[str, Tuple[str, int]] = {}
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        if name == "embed":
            plan["embed.weight"] = (VOCAB, 0)
        elif name == "lm_head":
            plan["lm_head.weight"] = (COLUMN, 0)
        if isinstance(mod, StepLevel):
            for lin in ("w_gate", "w_up"):
                plan[f"{pre}mlp.{lin}.weight"] = (COLUMN, 0)
            plan[f"{pre}mlp.w_down.weight"] = (ROW, 1)
        for cls, names in _COLUMN.items():
            if isinstance(mod, cls):
                for lin in names:
                    if hasattr(mod, lin):
                        plan[f"{pre}{lin}.weight"] = (COLUMN, 0)
                        if getattr(mod, lin).bias is not None:
                            plan[f"{pre}{lin}.bias"] = (COLUMN, 0)
                for lin in _ROW[cls]:
                    plan[f"{pre}{lin}.weight"] = (ROW, 1)
        if isinstance(mod, (SelfModifyingTitans, ContextLevel)):
            for n, _ in mod.named_parameters():
                if n.split(".")[0] in _HEAD_PARAMS + _HEAD_CHILDREN:
                    plan[f"{pre}{n}"] = (HEADS, 0)
    return plan


class _Linear(nn.Module):
    """A megatron-core parallel linear that returns only its output (like ``nn.Linear``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, x):
        return self.inner(x)[0]


def _slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).detach().clone()


def _mp_config():
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    return ModelParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False)


def _parallel_linear(lin: nn.Linear, style: str, rank: int, size: int, config) -> _Linear:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    has_bias = lin.bias is not None
    init = nn.init.zeros_                       # weights are copied from the full model below
    if style == COLUMN:
        inner = ColumnParallelLinear(lin.in_features, lin.out_features, config=config, init_method=init,
                                     bias=has_bias, gather_output=False)
        w = _slice(lin.weight, 0, rank, size)
        b = _slice(lin.bias, 0, rank, size) if has_bias else None
    else:
        inner = RowParallelLinear(lin.in_features, lin.out_features, config=config, init_method=init,
                                  bias=has_bias, input_is_parallel=True, skip_bias_add=False)
        w = _slice(lin.weight, 1, rank, size)
        b = lin.bias.detach().clone() if has_bias else None
    with torch.no_grad():
        inner.weight.copy_(w)
        if has_bias:
            inner.bias.copy_(b)
    _mark_sharded(inner.weight, 0 if style == COLUMN else 1)
    return _Linear(inner).to(lin.weight.dtype)


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    """megatron-core sets the tensor-parallel attributes only when it initialises the weight itself;
    DeepSpeed's gradient norm needs them to count each shard once and replicated weights once."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    if not getattr(param, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        set_tensor_model_parallel_attributes(param, True, dim, 1)


class _ScatterLastDim(torch.autograd.Function):
    """Forward: this rank's slice of the last dim. Backward: all-gather the slices over TP.
    (megatron-core's scatter region allocates its backward buffer on CUDA, so not usable on CPU.)"""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(size, -1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, -1), None


class ScatterHeads(nn.Module):
    """``z -> this rank's head slice of z`` (backward: all-gather), for CMS context levels."""

    def forward(self, z):
        from megatron.core import parallel_state as ps
        return _ScatterLastDim.apply(z, ps.get_tensor_model_parallel_group())


def _shard_parameter(module: nn.Module, path: str, rank: int, size: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    *parents, leaf = path.split(".")
    owner = module
    for p in parents:
        owner = getattr(owner, p) if not p.isdigit() else owner[int(p)]
    old = getattr(owner, leaf) if not leaf.isdigit() else owner[int(leaf)]
    new = nn.Parameter(_slice(old, 0, rank, size), requires_grad=old.requires_grad)
    set_tensor_model_parallel_attributes(new, True, 0, 1)
    if leaf.isdigit():
        owner[int(leaf)] = new
    else:
        setattr(owner, leaf, new)


def apply_tensor_parallel(model: nn.Module) -> nn.Module:
    """Shard ``model`` (a full :class:`LanguageModel`, identical on every TP rank) in place."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if size == 1:
        return model
    config = _mp_config()
    plan = shard_plan(model)
    linears = {n.rsplit(".", 1)[0]: style for n, (style, _) in plan.items()
               if style in (COLUMN, ROW) and n.endswith(".weight")}
    for name, style in linears.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, _parallel_linear(getattr(parent, leaf), style, rank, size, config))
    for name, (style, _) in plan.items():
        if style == HEADS:
            _shard_parameter(model, name, rank, size)
    for mod in model.modules():
        if isinstance(mod, (SelfModifyingTitans, ContextLevel, Attention)):
            heads = mod.n_heads if isinstance(mod, Attention) else mod.H
            local = heads // size
            if isinstance(mod, Attention):
                mod.n_heads = local
            else:
                mod.H = local
            if isinstance(mod, ContextLevel):
                mod.local_heads = ScatterHeads()
    full = model.embed
    emb = VocabParallelEmbedding(full.num_embeddings, full.embedding_dim, init_method=nn.init.zeros_,
                                 config=config)
    with torch.no_grad():
        emb.weight.copy_(_slice(full.weight, 0, rank, size))
    _mark_sharded(emb.weight, 0)
    model.embed = emb.to(full.weight.dtype)
    model.tensor_parallel = size
    return model


def parallel_loss(model: nn.Module, input_ids, labels, doc_ids=None, token_count=None) -> torch.Tensor:
    """Next-token loss of a (possibly tensor-parallel) model: vocab-parallel logits + cross entropy.

    ``token_count``: the number of labelled tokens the loss is averaged over (default: this
    batch's). Data-parallel ranks pass ``global count / dp`` so that DP-averaged gradients equal the
    gradients of one process averaging over the whole batch.
    """
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy
    h = model.hidden(input_ids, doc_ids)
    mask = labels != -100
    count = mask.sum() if token_count is None else token_count
    if getattr(model, "tensor_parallel", 1) == 1:
        logits = model.logits(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="none")
        return losses.sum() / count
    h = copy_to_tensor_model_parallel_region(h)              # backward: all-reduce over TP
    weight = model.lm_head.weight if model.lm_head is not None else model.embed.weight
    logits = (h @ weight.t()).float()                         # (B, T, V / TP)
    losses = vocab_parallel_cross_entropy(logits, labels.clamp_min(0))
    return (losses * mask).sum() / count
