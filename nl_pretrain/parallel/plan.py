"""``nl-pretrain plan``: which TP x PP x DP layouts fit a cluster, and which is fastest.

For a model (preset or config), a cluster (``--gpus``, ``--gpu-memory``, ``--gpus-per-node``), a
sequence length and a global batch, every layout (tensor, pipeline, data parallel, ZeRO stage, micro
batch, activation checkpointing) is checked with the same rules as a real launch
(:func:`~nl_pretrain.parallel.topology.check_layout`), its per-rank peak memory estimated
(:func:`~nl_pretrain.parallel.memory_model.estimate`) and its step time modelled:

    step = compute x (1 + bubble) + launches + collectives          (no overlap: an upper bound)

- compute: training FLOPs (:func:`nl_pretrain.train.flops.flops_per_token`, inner-loop FLOPs of the
  memories included) of the global batch over ``gpus x peak x mfu``; activation checkpointing adds
  one forward (+1/3);
- bubble: the 1F1B pipeline's ``(pp - 1) / grad_accum``;
- launches: kernel launches of one block's forward + backward (bench/results/launches.json, the
  Triton path), times the stage's blocks and micro-steps, times ``launch_us`` (checkpointing: x1.5);
- collectives: bytes per rank of the DP gradient reduction (ZeRO-3 also gathers the weights in the
  forward and the backward), the TP all-reduces of every row-parallel output (the mixer and each CMS
  level, forward and backward) and the pipeline's activations, each over its link: NVLink inside a
  node, the network across nodes (ring: ``2 (n - 1) / n`` of the payload).

Nothing is allocated: parameters from a meta build, activations traced on fake tensors.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from nl_pretrain.config import ConfigError
from nl_pretrain.parallel.memory_model import GIB, estimate, stage_parameter_counts
from nl_pretrain.parallel.topology import Layout, LayoutError, check_layout

LAUNCHES = Path(__file__).resolve().parents[2] / "bench" / "results" / "launches.json"


def rank_parameters(cfg, layout: Layout) -> Dict[int, int]:
    """``{pipeline stage: parameters one rank of it holds}`` (before ZeRO-3 partitioning); every
    tensor-parallel and data-parallel rank of a stage holds the same count."""
    return stage_parameter_counts(cfg.model, layout.tp, layout.pp)


@dataclass
class Cluster:
    gpus: int
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0      # dense bf16 per GPU (H100/H200)
    mfu: float = 0.4                # fraction of peak the matmuls reach
    intra_gbps: float = 450.0       # GB/s per GPU inside a node (NVLink)
    inter_gbps: float = 50.0        # GB/s per GPU across nodes (400 Gb/s network)
    launch_us: float = 5.0          # seconds per kernel launch, in microseconds


@dataclass
class Candidate:
    tp: int
    pp: int
    dp: int
    zero: int
    micro: int
    accum: int
    act_ckpt: bool
    memory: float = 0.0                       # bytes, the largest rank
    parts: Dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0
    times: Dict[str, float] = field(default_factory=dict)
    comm_bytes: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        return (f"TP{self.tp} PP{self.pp} DP{self.dp} ZeRO-{self.zero} micro {self.micro} accum {self.accum} "
                f"act-ckpt {'on' if self.act_ckpt else 'off'}")


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _launches_per_block(family: str) -> int:
    try:
        rows = json.loads(LAUNCHES.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return 0
    counts = [r["total"] for r in rows if r["family"] == family and r["impl"] in ("triton", "-")]
    return max(counts) if counts else 0


def _layout_cfg(cfg, c: Candidate):
    out = copy.deepcopy(cfg)
    out.parallel.tensor, out.parallel.pipeline, out.parallel.zero_stage = c.tp, c.pp, c.zero
    out.parallel.activation_checkpointing = c.act_ckpt
    out.train.micro_batch_size, out.train.grad_accum = c.micro, c.accum
    return out


def candidates(cfg, gpus: int, gpus_per_node: int, global_batch: int) -> List[Candidate]:
    """Every layout of ``gpus`` ranks and ``global_batch`` sequences (tensor parallel inside a node)."""
    out = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node:
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if global_batch % dp:
                continue
            for micro in _divisors(global_batch // dp):
                accum = global_batch // (dp * micro)
                for zero in (0, 1, 2, 3):
                    for ac in (False, True):
                        out.append(Candidate(tp, pp, dp, zero, micro, accum, ac))
    return out


def step_time(cfg, c: Candidate, cluster: Cluster, seq_len: int, params: int) -> Dict[str, float]:
    from nl_pretrain.train.flops import flops_per_token
    m = cfg.model
    tokens = c.dp * c.micro * c.accum * seq_len
    flops = flops_per_token(m, params, seq_len) * tokens * (4 / 3 if c.act_ckpt else 1.0)
    compute = flops / (cluster.gpus * cluster.peak_tflops * 1e12 * cluster.mfu)
    bubble = (c.pp - 1) / c.accum if c.pp > 1 else 0.0
    blocks = m.n_layers // c.pp
    launches = _launches_per_block(m.family) * blocks * c.accum * (1.5 if c.act_ckpt else 1.0)
    launch_s = launches * cluster.launch_us * 1e-6
    # collectives (bytes per rank), each ring over n ranks moves 2 (n - 1) / n of its payload
    w = 2 if cfg.train.precision == "bf16" else 4
    rank_params = max(stage_parameter_counts(m, c.tp, c.pp).values())
    ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0          # noqa: E731
    dp_bytes = rank_params * w * ring(c.dp) * (1.5 if c.zero == 3 else 1.0)
    act = c.micro * seq_len * m.d_model * w
    tp_bytes = act * ring(c.tp) * 2 * (1 + len(m.cms)) * blocks * c.accum
    pp_bytes = act * 2 * c.accum if c.pp > 1 else 0.0
    node = cluster.gpus_per_node
    dp_link = cluster.inter_gbps if c.tp * c.dp > node else cluster.intra_gbps
    pp_link = cluster.inter_gbps if c.tp * c.dp * c.pp > node else cluster.intra_gbps
    comm = (dp_bytes / dp_link + tp_bytes / cluster.intra_gbps + pp_bytes / pp_link) / 1e9
    return {"compute": compute * (1 + bubble), "launches": launch_s, "collectives": comm,
            "comm_bytes": dp_bytes + tp_bytes + pp_bytes, "total": compute * (1 + bubble) + launch_s + comm}


def packing_factor(model_cfg, doc_length: float) -> float:
    """Upper bound of the packed-document blow-up for documents of ``doc_length`` tokens on average:
    each document starts at a multiple of the model's chunk alignment (the least common multiple of
    its chunk sizes), so it grows by less than one alignment: ``1 + alignment / doc_length``."""
    import math
    if not doc_length:
        return 1.0
    sizes = [1]
    if model_cfg.family not in ("transformer", "hope_attention"):      # the SMT mixer's chunks
        sizes += [model_cfg.chunk_mem] + ([model_cfg.chunk_proj] if model_cfg.adaptive_projections else [])
    sizes += [lvl.period for lvl in model_cfg.cms if lvl.kind == "context"]
    align = 1
    for x in sizes:
        align = align * x // math.gcd(align, x)
    return 1.0 + (align if align > 1 else 0) / doc_length


def plan(cfg, cluster: Cluster, seq_len: int, global_batch: int, device: str = "cuda", doc_length: float = 0.0):
    """``(fits best first, rejected with reasons)`` for ``cfg`` on ``cluster``; ``doc_length``: mean
    packed-document length in tokens (0: one document per row, no blow-up)."""
    if cluster.gpus < 1 or cluster.gpus_per_node < 1:
        raise ConfigError(f"--gpus ({cluster.gpus}) and --gpus-per-node ({cluster.gpus_per_node}) must be >= 1")
    if cluster.gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory ({cluster.gpu_memory_gib:g}) must be > 0 GiB, e.g. --gpu-memory 80")
    if seq_len < 1 or seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"--seq-len ({seq_len}) must be in [1, model.max_seq_len={cfg.model.max_seq_len}]; "
                          f"raise --model.max_seq_len or shorten the sequence")
    if global_batch < 1:
        raise ConfigError(f"--global-batch ({global_batch}) must be >= 1 sequences")
    if doc_length < 0:
        raise ConfigError(f"--doc-length ({doc_length:g}) must be >= 0 tokens (0: documents fill their rows)")
    packing = packing_factor(cfg.model, doc_length)
    cfg = copy.deepcopy(cfg)
    cfg.data.seq_len = seq_len
    from nl_pretrain.cli import count_parameters
    params = sum(count_parameters(cfg.model).values())
    fits, rejected = [], []
    for c in candidates(cfg, cluster.gpus, cluster.gpus_per_node, global_batch):
        lc = _layout_cfg(cfg, c)
        try:
            check_layout(lc, cluster.gpus, global_batch)
        except LayoutError as err:
            c.reason = "; ".join(line.strip(" -") for line in str(err).splitlines()[1:])
            rejected.append(c)
            continue
        layout = Layout(c.tp, c.pp, c.dp, c.zero, c.micro, c.accum)
        per_stage = {s: estimate(lc, layout, s, packing=packing, device=device) for s in range(c.pp)}
        worst = max(per_stage, key=lambda s: per_stage[s]["total"])
        c.parts, c.memory = per_stage[worst], per_stage[worst]["total"]
        t = step_time(lc, c, cluster, seq_len, params)
        c.step_s, c.comm_bytes, c.times = t["total"], t["comm_bytes"], t
        if c.memory > cluster.gpu_memory_gib * GIB:
            big = max(("weights", "grads", "optimizer", "activations", "logits", "zero_buffers", "pipe_buffers"),
                      key=lambda k: c.parts[k])
            c.reason = (f"needs {c.memory / GIB:.1f} GiB per rank > {cluster.gpu_memory_gib:g} GiB "
                        f"(largest part: {big} {c.parts[big] / GIB:.1f} GiB, stage {worst})")
            rejected.append(c)
        else:
            fits.append(c)
    fits.sort(key=lambda c: (c.step_s, c.memory))
    rejected.sort(key=lambda c: (c.memory == 0, c.memory))
    return fits, rejected


def report(cfg, cluster: Cluster, seq_len: int, global_batch: int, top: int = 10, show_rejected: int = 20,
           doc_length: float = 0.0) -> str:
    fits, rejected = plan(cfg, cluster, seq_len, global_batch, doc_length=doc_length)
    m = cfg.model
    lines = [f"plan: {m.preset or m.family} ({m.n_layers} layers, d={m.d_model}), {cluster.gpus} GPUs x "
             f"{cluster.gpu_memory_gib:g} GiB ({cluster.gpus_per_node} per node), seq_len {seq_len}, global batch "
             f"{global_batch} sequences, {cfg.train.precision}, optimizer {cfg.optim.name}"
             + (f", packed documents of ~{doc_length:g} tokens (blow-up <= {packing_factor(m, doc_length):.3f})"
                if doc_length else ""),
             f"{len(fits)} layouts fit, {len(rejected)} rejected; step time = compute x (1 + bubble) + launches + "
             f"collectives at {cluster.mfu:g} x {cluster.peak_tflops:g} TFLOP/s, an estimate",
             f"{'#':>3} {'layout':58s} {'GiB/rank':>9} {'step s':>8} {'compute':>8} {'launch':>7} {'comm':>7} "
             f"{'comm GB':>8}"]
    for i, c in enumerate(fits[:top] if top else fits):
        t = c.times
        lines.append(f"{i + 1:>3} {c.describe():58s} {c.memory / GIB:9.1f} {c.step_s:8.3f} {t['compute']:8.3f} "
                     f"{t['launches']:7.3f} {t['collectives']:7.3f} {c.comm_bytes / 1e9:8.2f}")
    if top and len(fits) > top:
        lines.append(f"    ... {len(fits) - top} more that fit (--top 0 lists all)")
    if not fits:
        lines.append("    none fits: more GPUs, a smaller micro batch or a shorter sequence")
    shown = rejected[:show_rejected] if show_rejected else rejected
    lines.append(f"rejected ({len(rejected)}; closest to fitting first):")
    for c in shown:
        lines.append(f"    {c.describe():58s} {c.reason}")
    if show_rejected and len(rejected) > show_rejected:
        lines.append(f"    ... {len(rejected) - show_rejected} more rejected (--show-rejected 0 lists all)")
    lines.append("plan: nothing was allocated")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    """``nl-pretrain plan`` (registered in :mod:`nl_pretrain.cli`)."""
    from nl_pretrain.config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.precision:
        cfg.train.precision = args.precision
    cluster = Cluster(args.gpus, args.gpu_memory, args.gpus_per_node, args.peak_tflops, args.mfu)
    print(report(cfg, cluster, args.seq_len or cfg.data.seq_len, args.global_batch, args.top, args.show_rejected,
                 args.doc_length))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="list the parallel layouts that fit a cluster, fastest first",
                       epilog="any --section.key=value after the options overrides the config (e.g. --model.preset=hope-7b)")
    p.add_argument("--config", help="YAML file (see configs/)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; tensor parallel stays inside one")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: train.precision")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (default H100: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak the matmuls reach (default 0.4)")
    p.add_argument("--doc-length", type=float, default=0.0,
                   help="mean packed-document length in tokens: adds the re-laid rows' blow-up (default 0: none)")
    p.add_argument("--top", type=int, default=10, help="layouts that fit to list (0 = all)")
    p.add_argument("--show-rejected", type=int, default=20, help="rejected layouts to list (0 = all)")
    p.set_defaults(func=cmd_plan)
