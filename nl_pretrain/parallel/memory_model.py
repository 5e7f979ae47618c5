"""Per-rank memory of a training step, from the model's shapes (nothing allocated).

:func:`parameters_per_rank` counts what each rank of a TP x PP x DP layout holds: the model is built
once on the meta device, every parameter's split comes from the same
:func:`~nl_pretrain.parallel.tensor.shard_plan` the real run uses, and the pipeline stage of every
parameter from the layer list of :mod:`nl_pretrain.parallel.pipeline` (embedding on the first
stage, tied head also on the last, final norm and untied head on the last).
"""
from __future__ import annotations

import functools
import json
from typing import Dict, List, Tuple

import torch

from nl_pretrain.parallel.topology import Layout

GIB = 1024 ** 3


@functools.lru_cache(maxsize=32)
def _parameter_table(model_json: str) -> Tuple[Tuple[str, int, bool], ...]:
    """``(name, numel, tensor-parallel split?)`` of every parameter of the model (meta device)."""
    from nl_pretrain.config import ModelConfig, CMSLevel
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.tensor import shard_plan
    tree = json.loads(model_json)
    tree["cms"] = [CMSLevel(**lvl) for lvl in tree["cms"]]
    with torch.device("meta"):
        model = LanguageModel(ModelConfig(**tree))
    plan = shard_plan(model)
    return tuple((name, p.numel(), name in plan) for name, p in model.named_parameters())


def parameter_table(model_cfg) -> Tuple[Tuple[str, int, bool], ...]:
    import dataclasses
    return _parameter_table(json.dumps(dataclasses.asdict(model_cfg), sort_keys=True))


def parameter_stages(name: str, pp: int, n_layers: int, tied: bool) -> List[int]:
    """The pipeline stages that hold parameter ``name`` (a tied embedding: the first and the last)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return [int(parts[1]) // (n_layers // pp)]
    if parts[0] == "embed":
        return sorted({0, pp - 1}) if tied else [0]
    return [pp - 1]                                    # final norm, untied lm head


def stage_parameter_counts(model_cfg, tp: int, pp: int) -> Dict[int, int]:
    """``{pipeline stage: parameters one tensor-parallel rank of that stage holds}`` (every tensor-
    parallel split is even, so all TP ranks of a stage hold the same count)."""
    counts = {s: 0 for s in range(pp)}
    for name, numel, split in parameter_table(model_cfg):
        local = numel // tp if split else numel
        for s in parameter_stages(name, pp, model_cfg.n_layers, model_cfg.tie_embeddings):
            counts[s] += local
    return counts


def parameters_per_rank(model_cfg, tp: int, pp: int, dp: int = 1) -> Dict[int, int]:
    """``{global rank: parameters it holds}`` under tensor ``tp`` x pipeline ``pp`` x data ``dp``
    (rank order of :class:`~nl_pretrain.parallel.topology.Layout`: tensor fastest, then data, then
    pipeline). Counts are before ZeRO-3 partitioning (which divides them by ``dp``)."""
    stages = stage_parameter_counts(model_cfg, tp, pp)
    layout = Layout(tp, pp, dp, 0, 1, 1)
    return {r: stages[layout.coords(r)[2]] for r in range(layout.world)}
