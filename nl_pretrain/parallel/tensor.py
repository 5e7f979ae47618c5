"""Tensor parallelism applied from outside the model (the model stays single-device math).

Every rank builds the single-device model on the meta device, then :func:`apply_tensor_parallel`
materialises this rank's slice of each tensor (:mod:`nl_pretrain.parallel.materialize`), as each
module declares it (``tp_plan``, :mod:`nl_pretrain.model.sharding`):
projections that produce heads become megatron-core ``ColumnParallelLinear`` (output channels are
head-major, so a contiguous slice is a contiguous block of heads), the projections that read heads
become ``RowParallelLinear``, per-head tensors (learned initial states of the fast-weight memories,
momentum betas, gate biases, output norms, depthwise convolution channels) are sliced by head, and
the embedding becomes ``VocabParallelEmbedding``. Modules read their local head count from these
shapes. A head's fast-weight memory is updated entirely on the rank that owns the head: no
communication inside the inner loop. CMS context levels read this rank's head slice of ``z``
(``local_heads``); step levels are column -> row parallel SwiGLUs.

:func:`shard_plan` says how each parameter is split; the dry run and the checkpoints use it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from nl_pretrain.model.sharding import COLUMN, HEAD_SLICE, HEADS, REPLICATED, ROW, VOCAB

_DIM = {COLUMN: 0, ROW: 1, HEADS: 0, VOCAB: 0}


def module_plan(model: nn.Module) -> Dict[str, str]:
    """``{module or parameter path: style}`` from the ``tp_plan`` each module declares; raises for
    a parameter that no plan covers."""
    out: Dict[str, str] = {}

    def visit(mod: nn.Module, prefix: str) -> None:
        plan = getattr(type(mod), "tp_plan", None)
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if plan is None and own:
            raise TypeError(f"{type(mod).__name__} at '{prefix or 'the model'}' holds parameters {own} but "
                            f"declares no tp_plan (nl_pretrain/model/sharding.py)")
        for n in own:
            if n not in plan:
                raise TypeError(f"{type(mod).__name__}.tp_plan does not say how '{n}' splits ({prefix}{n})")
            out[prefix + n] = plan[n]
        for n, child in mod.named_children():
            if plan is not None and n in plan:
                out[prefix + n] = plan[n]
            else:
                visit(child, f"{prefix}{n}.")

    visit(model, "")
    return out


def shard_plan(model: nn.Module) -> Dict[str, Tuple[str, int]]:
    """``{parameter name: (style, dim)}`` for every tensor-parallel parameter; others are replicated."""
    plan: Dict[str, Tuple[str, int]] = {}
    for path, style in module_plan(model).items():
        if style in (REPLICATED, HEAD_SLICE):
            continue
        target = _get(model, path)
        if isinstance(target, nn.Parameter):
            plan[path] = (style, _DIM[style])
        elif style == HEADS:
            plan.update({f"{path}.{n}": (HEADS, 0) for n, _ in target.named_parameters()})
        else:                                   # a linear layer or the embedding
            plan[f"{path}.weight"] = (style, _DIM[style])
            if style == COLUMN and getattr(target, "bias", None) is not None:
                plan[f"{path}.bias"] = (COLUMN, 0)   # a row-parallel bias is added once, replicated
    return plan


def _get(model: nn.Module, path: str):
    owner = model
    for part in path.split("."):
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    return owner


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
    """This rank's slice of ``t``: a view (copied into the parallel layer's own parameter)."""
    n = t.shape[dim] // size
    return t.detach().narrow(dim, rank * n, n)


def _mp_config():
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    return ModelParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False)


def _parallel_linear(lin: nn.Linear, style: str, rank: int, size: int, config, weight, bias) -> _Linear:
    """``weight``, ``bias``: the full tensors (the layer's own, or generated for a meta layer)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    has_bias = lin.bias is not None
    init = nn.init.zeros_                       # the slices of the full tensors are copied in below
    if style == COLUMN:
        inner = ColumnParallelLinear(lin.in_features, lin.out_features, config=config, init_method=init,
                                     bias=has_bias, gather_output=False)
        w = _slice(weight, 0, rank, size)
        b = _slice(bias, 0, rank, size) if has_bias else None
    else:
        inner = RowParallelLinear(lin.in_features, lin.out_features, config=config, init_method=init,
                                  bias=has_bias, input_is_parallel=True, skip_bias_add=False)
        w = _slice(weight, 1, rank, size)
        b = bias.detach().clone() if has_bias else None
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


def _shard_parameter(module: nn.Module, path: str, rank: int, size: int, full: torch.Tensor) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    parent_path, _, leaf = path.rpartition(".")
    owner = _get(module, parent_path) if parent_path else module
    old = owner[int(leaf)] if leaf.isdigit() else getattr(owner, leaf)
    new = nn.Parameter(_slice(full, 0, rank, size).to(old.dtype, copy=True), requires_grad=old.requires_grad)
    set_tensor_model_parallel_attributes(new, True, 0, 1)
    if leaf.isdigit():
        owner[int(leaf)] = new
    else:
        setattr(owner, leaf, new)


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(_get(model, parent_path) if parent_path else model, leaf, new)


def _vocab_parallel(full: nn.Embedding, rank: int, size: int, config, weight) -> nn.Module:
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    emb = VocabParallelEmbedding(full.num_embeddings, full.embedding_dim, init_method=nn.init.zeros_,
                                 config=config)
    with torch.no_grad():
        emb.weight.copy_(_slice(weight, 0, rank, size))
    _mark_sharded(emb.weight, 0)
    return emb.to(full.weight.dtype)


def tensor_parallel_size() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def apply_tensor_parallel(model: nn.Module, value=None, keep=None) -> nn.Module:
    """Shard ``model`` (a full :class:`LanguageModel`, identical on every TP rank) in place, as its
    modules' ``tp_plan`` says. ``value(name)``: the full tensor of parameter ``name`` (default: the
    parameter itself; a meta-built model passes its initial values,
    :mod:`nl_pretrain.parallel.materialize`), read before its module is replaced. ``keep(path)``:
    whether this rank holds the module or parameter at ``path`` (others are left as they are)."""
    from megatron.core import parallel_state as ps
    size, rank = tensor_parallel_size(), ps.get_tensor_model_parallel_rank()
    if size == 1:
        return model
    value = value or (lambda name: _get(model, name).detach())
    keep = keep or (lambda path: True)
    config = _mp_config()
    params = shard_plan(model)
    for path, style in module_plan(model).items():
        if not keep(path):
            continue
        if style in (COLUMN, ROW):
            lin = _get(model, path)
            bias = value(f"{path}.bias") if lin.bias is not None else None
            _set_child(model, path, _parallel_linear(lin, style, rank, size, config, value(f"{path}.weight"), bias))
        elif style == VOCAB:
            _set_child(model, path, _vocab_parallel(_get(model, path), rank, size, config, value(f"{path}.weight")))
        elif style == HEAD_SLICE:
            _set_child(model, path, ScatterHeads())
    for name, (style, _) in params.items():
        if style == HEADS and keep(name):
            _shard_parameter(model, name, rank, size, value(name))
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
    if tensor_parallel_size() == 1:
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
