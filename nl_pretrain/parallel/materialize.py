"""Shards built in place: a rank materialises only what it holds of a meta-device model.

Every rank builds :class:`~nl_pretrain.model.LanguageModel` under ``torch.device("meta")`` (no
memory). :func:`materialize` then gives this rank's tensors their values:

1. tensor-parallel tensors of this pipeline stage (:func:`~nl_pretrain.parallel.tensor.apply_tensor_parallel`
   with :func:`full_value` as the source): each full tensor is generated from its own seed
   (:mod:`nl_pretrain.model.init`), this rank's slice is kept, the rest is freed at once;
2. the replicated tensors of this stage (norms, and everything when ``tp = 1``), in full;
3. nothing of the other stages: their modules stay on the meta device and are never used here.

The values are exactly the one-process build's from the same init seed. Peak host memory is this
rank's share plus the largest single full tensor (the embedding, at the presets' sizes).

Under ZeRO-3 the steps run root by root (:func:`held_in_order`: the embedding, each block, the norm,
the head) and each root, once materialised, is handed to ``deepspeed.zero.Init(module=...)``
(:func:`partition_zero3`), which keeps this rank's 1/DP partition of every tensor and frees the rest:
the peak is the partitions made so far plus one root's tensor-parallel share (and one full tensor).
The slow CMS step levels are left whole (they never enter the engine, parallel/cms_sync.py). Over
one DP rank nothing is split: the share is built whole and the engine converts it.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn

from nl_pretrain.model.init import initial_value


def held_roots(model: nn.Module, pp: int, stage: int, block_ids: List[int]) -> List[str]:
    """Top-level module paths this pipeline stage runs: its blocks, the embedding on the first stage
    (and on the last when the head is tied to it), the final norm and head on the last."""
    roots = [f"blocks.{i}" for i in block_ids]
    if stage == 0 or (stage == pp - 1 and model.lm_head is None):
        roots.append("embed")
    if stage == pp - 1:
        roots.append("norm")
        if model.lm_head is not None:
            roots.append("lm_head")
    return roots


def held_in_order(model: nn.Module, roots: List[str]) -> List[str]:
    """``roots`` in the model's own order (embedding, blocks, norm, head): the order ZeRO-3 numbers
    the parameters in when it partitions the whole module at once."""
    order = {}
    for name, _ in model.named_parameters():
        for r in roots:
            if (name == r or name.startswith(r + ".")) and r not in order:
                order[r] = len(order)
    return sorted(roots, key=lambda r: order.get(r, len(order)))


def holds(roots: List[str]) -> Callable[[str], bool]:
    """``keep(path)``: whether a module or parameter path lies under one of ``roots``."""
    def keep(path: str) -> bool:
        return any(path == r or path.startswith(r + ".") for r in roots)
    return keep


def full_value(model: nn.Module) -> Callable[[str], torch.Tensor]:
    """``value(name)``: the full single-device tensor of parameter ``name``: its own value where it is
    materialised, else its initial value generated on the CPU."""
    def value(name: str) -> torch.Tensor:
        owner = model
        for part in name.split("."):
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        if owner.is_meta:
            return initial_value(model, name, model.init_seed, owner.shape)
        return owner.detach()
    return value


@torch.no_grad()
def materialize_held(model: nn.Module, roots: List[str], device: torch.device) -> None:
    """Steps 2 and 3: every parameter under ``roots`` still on the meta device gets its full initial
    value; the held modules move to ``device``. Call after tensor parallelism (step 1)."""
    keep = holds(roots)
    for mod_name, mod in model.named_modules():
        for leaf, p in list(mod.named_parameters(recurse=False)):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            if p.is_meta and keep(name):
                new = nn.Parameter(initial_value(model, name, model.init_seed, p.shape).to(p.dtype),
                                   requires_grad=p.requires_grad)
                if leaf.isdigit():                       # a ParameterList entry
                    mod[int(leaf)] = new
                else:
                    setattr(mod, leaf, new)
    for r in roots:
        owner = model
        for part in r.split("."):
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        owner.to(device)



def _get(model: nn.Module, path: str) -> nn.Module:
    owner = model
    for part in path.split("."):
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    return owner


@torch.no_grad()
def partition_zero3(model: nn.Module, root: str, ds_config: dict, dp_group, mpu, bf16: bool) -> int:
    """ZeRO-3: partition the materialised parameters under ``root`` over ``dp_group`` now
    (``deepspeed.zero.Init(module=...)``: this rank keeps its 1/DP partition, the rest is freed), as
    ``deepspeed.initialize`` would do later for the whole module, cast first to bf16 under a bf16
    engine (as the engine casts a module it partitions itself). Slow CMS step levels (period > 1)
    are skipped: they stay whole, outside the engine. Returns the elements this rank keeps."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param
    from nl_pretrain.model.cms import StepLevel
    mod = _get(model, root)
    skip = {id(p) for m in mod.modules() if isinstance(m, StepLevel) and m.period > 1 for p in m.parameters()}
    params = [p for p in mod.parameters() if id(p) not in skip and not is_zero_param(p)]
    if not params:
        return 0
    for p in params:
        if bf16 and p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
    holder = nn.Module()                       # just these parameters (the same objects)
    holder.params = nn.ParameterList(params)
    deepspeed.zero.Init(module=holder, data_parallel_group=dp_group, config_dict_or_path=ds_config, mpu=mpu,
                        dtype=torch.bfloat16 if bf16 else torch.float32)
    return sum(p.ds_tensor.numel() for p in params)
