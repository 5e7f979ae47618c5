"""``nl-pretrain train --dry-run``: the layout, what lives on each rank, and a memory estimate.

Nothing is allocated: the model is built on the meta device and split with the same
:func:`~nl_pretrain.parallel.tensor.shard_plan` the real run uses.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from nl_pretrain.parallel.tensor import shard_plan
from nl_pretrain.parallel.topology import Layout, check_layout, stage_layers

GIB = 1024 ** 3


def _stage_of(name: str, layout: Layout, n_layers: int, tied: bool) -> List[int]:
    parts = name.split(".")
    if parts[0] == "blocks":
        return [int(parts[1]) // (n_layers // layout.pp)]
    if parts[0] == "embed":
        return sorted({0, layout.pp - 1}) if tied else [0]   # a tied head lives on the last stage too
    return [layout.pp - 1]                                    # final norm, untied lm head


def stage_parameters(cfg, layout: Layout) -> Dict[int, int]:
    """Parameters held by one tensor-parallel rank of each pipeline stage."""
    from nl_pretrain.model import LanguageModel
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    plan = shard_plan(model)
    counts = {s: 0 for s in range(layout.pp)}
    for name, p in model.named_parameters():
        local = p.numel() // layout.tp if name in plan else p.numel()
        for s in _stage_of(name, layout, cfg.model.n_layers, model.lm_head is None):
            counts[s] += local
    return counts


def memory_estimate(cfg, layout: Layout, params: int) -> Dict[str, float]:
    """Bytes per rank: weights, gradients, optimizer state (ZeRO-partitioned over DP), activations.

    Mixed precision (bf16) keeps bf16 weights and gradients plus an fp32 master copy; AdamW keeps two
    fp32 moments. Activations: ~16 values per token and width per layer (pre-norms, projections,
    MLP hidden) plus, for memory layers, one fast-weight state per chunk boundary and memory, kept
    for the backward; with activation checkpointing only each block's input is kept. An estimate,
    not a measurement.
    """
    m, dp, z = cfg.model, layout.dp, layout.zero_stage
    bf16 = cfg.train.precision == "bf16"
    w_bytes = 2 if bf16 else 4
    weights = params * w_bytes / (dp if z >= 3 else 1)
    grads = params * w_bytes / (dp if z >= 2 else 1)
    optim = params * (8 + (4 if bf16 else 0)) / (dp if z >= 1 else 1)
    tokens = layout.micro_batch * cfg.data.seq_len
    layers = m.n_layers // layout.pp
    d_local = m.d_model // layout.tp
    per_layer = tokens * (2 * m.d_model + 14 * d_local) * w_bytes
    if m.family not in ("transformer", "hope_attention"):
        dh, heads = m.d_model // m.n_heads, m.n_heads // layout.tp
        n_mem = 5 if m.adaptive_projections else 1
        hidden = max(1, int(round(m.memory_expansion * dh)))
        state = 2 * dh * hidden if m.main_memory == "mlp" else dh * dh
        per_layer += layout.micro_batch * heads * n_mem * state * (-(-cfg.data.seq_len // m.chunk_mem)) * 4
    if getattr(cfg.parallel, "activation_checkpointing", False):
        activations = layers * tokens * m.d_model * w_bytes + per_layer
    else:
        activations = layers * per_layer
    in_flight = min(layout.pp, layout.grad_accum) if layout.pp > 1 else 1   # pipeline micro-batches held
    activations *= in_flight
    return {"weights": weights, "grads": grads, "optimizer": optim, "activations": activations,
            "total": weights + grads + optim + activations}


def dry_run_report(cfg, world_size: int, global_batch: Optional[int] = None) -> str:
    layout = check_layout(cfg, world_size, global_batch)
    m = cfg.model
    counts = stage_parameters(cfg, layout)
    lines = [f"layout: {layout.describe()}",
             f"model {m.preset or m.family}: {m.n_layers} layers, d={m.d_model}, {m.n_heads} heads, vocab "
             f"{m.vocab_size}; {layout.micro_batch * cfg.data.seq_len:,} tokens per rank per micro-step",
             f"{'rank':>5} {'tp':>3} {'dp':>3} {'pp':>3}  {'layers':<10} {'heads':<10} {'vocab rows':<14} "
             f"{'params':>14} {'memory (GiB, est.)':>20}"]
    hpr, vpr = m.n_heads // layout.tp, m.vocab_size // layout.tp
    for rank in range(layout.world):
        tp, dp, pp = layout.coords(rank)
        layers = stage_layers(m.n_layers, layout.pp, pp)
        mem = memory_estimate(cfg, layout, counts[pp])
        lines.append(f"{rank:>5} {tp:>3} {dp:>3} {pp:>3}  {f'{layers.start}-{layers.stop - 1}':<10} "
                     f"{f'{tp * hpr}-{(tp + 1) * hpr - 1}':<10} {f'{tp * vpr}-{(tp + 1) * vpr - 1}':<14} "
                     f"{counts[pp]:>14,} {mem['total'] / GIB:>20.3f}")
    mem = memory_estimate(cfg, layout, max(counts.values()))
    lines.append("largest rank: " + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in mem.items()))
    lines.append("dry run: nothing was trained")
    return "\n".join(lines)
