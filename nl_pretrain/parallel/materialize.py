"""Shards built in place: a rank materialises only what it holds of a meta-device model.

Every rank builds :class:`~nl_pretrain.model.LanguageModel` under ``torch.device("meta")`` (no
memory). :func:`materialize` then gives this rank's tensors their values:

1. tensor-parallel tensors of this pipeline stage (:func:`~nl_pretrain.parallel.tensor.apply_tensor_parallel`
   with :func:`full_value` as the source): each full tensor is generated from its own seed
   (:mod:`nl_pretrain.model.init`), this rank's slice is kept, the rest is freed at once;
2. the replicated tensors of this stage (norms, and everything when ``tp = 1``), in full;
3. nothing of the other stages: their modules stay on the meta device and are never used here.

The values are exactly the one-process build's from the same init seed. Peak host memory is this
rank's share plus the largest single full tensor (the embedding, at the presets' sizes). Under ZeRO-3
the rank materialises its full tensor/pipeline share and DeepSpeed partitions it over DP afterwards
(not a partition built in place).
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

