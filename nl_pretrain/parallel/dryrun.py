"""``nl-pretrain train --dry-run``: the layout, what lives on each rank, its peak memory, a verdict.

Nothing is allocated: parameters come from a meta-device build split with the same
:func:`~nl_pretrain.parallel.tensor.shard_plan` the real run uses, activations from tracing one
block on fake tensors (:mod:`nl_pretrain.parallel.memory_model`, checked against measurement by
bench/memory.py).
"""
from __future__ import annotations

from typing import Dict, Optional

from nl_pretrain.parallel.memory_model import GIB, estimate, memory_path, stage_parameter_counts
from nl_pretrain.parallel.topology import Layout, check_layout, stage_layers


def stage_parameters(cfg, layout: Layout) -> Dict[int, int]:
    """Parameters held by one tensor-parallel rank of each pipeline stage."""
    return stage_parameter_counts(cfg.model, layout.tp, layout.pp)


def memory_estimate(cfg, layout: Layout, stage: int = 0, device: str = "cuda") -> Dict[str, float]:
    """Peak bytes per rank of ``stage`` (:func:`nl_pretrain.parallel.memory_model.estimate`)."""
    return estimate(cfg, layout, stage, device=device)


def dry_run_report(cfg, world_size: int, global_batch: Optional[int] = None, gpu_memory_gib: float = 80.0,
                   device: str = "cuda") -> str:
    """The layout, every rank's share and peak memory, and whether it fits ``gpu_memory_gib``."""
    layout = check_layout(cfg, world_size, global_batch)
    m = cfg.model
    counts = stage_parameters(cfg, layout)
    mems = {s: memory_estimate(cfg, layout, s, device) for s in range(layout.pp)}
    lines = [f"layout: {layout.describe()}",
             f"model {m.preset or m.family}: {m.n_layers} layers, d={m.d_model}, {m.n_heads} heads, vocab "
             f"{m.vocab_size}; {layout.micro_batch * cfg.data.seq_len:,} tokens per rank per micro-step; "
             f"{cfg.train.precision}, memory path {memory_path(cfg, device)} ({device})",
             f"{'rank':>5} {'tp':>3} {'dp':>3} {'pp':>3}  {'layers':<10} {'heads':<10} {'vocab rows':<14} "
             f"{'params':>14} {'peak memory (GiB)':>18}"]
    hpr, vpr = m.n_heads // layout.tp, m.vocab_size // layout.tp
    for rank in range(layout.world):
        tp, dp, pp = layout.coords(rank)
        layers = stage_layers(m.n_layers, layout.pp, pp)
        lines.append(f"{rank:>5} {tp:>3} {dp:>3} {pp:>3}  {f'{layers.start}-{layers.stop - 1}':<10} "
                     f"{f'{tp * hpr}-{(tp + 1) * hpr - 1}':<10} {f'{tp * vpr}-{(tp + 1) * vpr - 1}':<14} "
                     f"{counts[pp]:>14,} {mems[pp]['total'] / GIB:>18.3f}")
    worst = max(mems, key=lambda s: mems[s]["total"])
    mem = mems[worst]
    parts = ", ".join(f"{k} {mem[k] / GIB:.3f}" for k in ("weights", "grads", "optimizer", "activations", "logits",
                                                           "transient", "zero_buffers", "pipe_buffers"))
    lines.append(f"largest rank (stage {worst}), GiB: {parts} (activations include fast-weight states "
                 f"{mem['fast_weight_states'] / GIB:.3f} and intra-chunk matrices {mem['intra_chunk'] / GIB:.3f}); "
                 f"total {mem['total'] / GIB:.3f}")
    peak = mem["total"] / GIB
    if peak <= gpu_memory_gib:
        lines.append(f"verdict: fits: peak {peak:.1f} GiB of {gpu_memory_gib:g} GiB per GPU "
                     f"({gpu_memory_gib - peak:.1f} GiB left)")
    else:
        lines.append(f"verdict: does NOT fit: peak {peak:.1f} GiB > {gpu_memory_gib:g} GiB per GPU; try "
                     f"nl-pretrain plan for layouts that fit (more tensor/pipeline parallel, ZeRO, a smaller "
                     f"micro batch, --parallel.activation_checkpointing=true)")
    lines.append("dry run: nothing was trained")
    return "\n".join(lines)
