"""Step time, tokens/s and collective bytes per step of the tiny preset per parallel layout (CPU, gloo).

    .venv/bin/python bench/parallel.py [--steps 4] [--families hope transformer]

Every layout trains for ``warmup + steps`` steps in real processes; the timed steps are averaged.
Collective bytes are counted by wrapping torch.distributed's collectives in every rank (DeepSpeed
and megatron-core both call them) and summed over ranks. HOPE runs twice: with its CMS step levels as
in the preset (periods 1 and 4: the slow level syncs once every 4 steps) and with every step level at
period 1 (synced every step). A CPU benchmark with 2 cores: compare layouts, not machines.
Writes a table and bench/results/parallel.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "parallel"))

COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "reduce", "all_to_all_single", "send", "isend")   # p2p: sender side


def _count_collectives(counter: dict) -> None:
    import torch.distributed as dist

    def wrap(name, fn):
        def inner(*args, **kwargs):
            if name not in ("send", "isend") and dist.get_world_size(kwargs.get("group")) == 1:
                return fn(*args, **kwargs)    # a group of one rank moves no bytes
            sizes = []                        # payload: the largest tensor, or tensor list, passed
            for a in list(args) + list(kwargs.values()):
                if hasattr(a, "element_size"):
                    sizes.append(a.numel() * a.element_size())
                elif isinstance(a, (list, tuple)):
                    sizes.append(sum(t.numel() * t.element_size() for t in a if hasattr(t, "element_size")))
            counter[name] = counter.get(name, 0) + max(sizes, default=0)
            return fn(*args, **kwargs)
        return inner
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def bench_layout(tree, warmup: int, steps: int):
    counter: dict = {}
    _count_collectives(counter)
    from nl_pretrain.config import build_config
    from nl_pretrain.parallel.trainer import DistributedTrainer, rank_batches
    cfg = build_config(tree)
    trainer = DistributedTrainer(cfg)
    data = rank_batches(cfg, trainer.layout, trainer.dp_rank)
    for s in range(warmup):
        trainer.train_step(s, [next(data) for _ in range(cfg.train.grad_accum)])
    counter.clear()
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        trainer.train_step(s, [next(data) for _ in range(cfg.train.grad_accum)])
    elapsed = time.perf_counter() - start
    return {"step_s": elapsed / steps, "bytes": {k: v / steps for k, v in counter.items()},
            "tokens_per_step": trainer.layout.global_batch * cfg.data.seq_len}


def tree_for(family, tp, pp, zero, periods, micro, seq):
    from workers import tiny_tree
    t = tiny_tree(family, tp=tp, pp=pp, zero=zero, micro=micro, accum=max(1, pp), steps=100)
    t["model"] = {"preset": f"{family}-tiny", "vocab_size": 260, "max_seq_len": seq}
    if family == "hope":
        t["model"]["cms"] = [{"kind": "context", "period": 16, "expansion": 2.0}] + [
            {"kind": "step", "period": k, "expansion": 2.0} for k in periods]
    t["data"] = {"seq_len": seq, "max_documents": 40, "val_fraction": 0.0}
    return t


def table(rows: list) -> str:
    """Markdown: one line per (family, CMS levels, layout)."""
    out = ["| family | CMS step levels | layout | ranks | step (s) | tokens/s | vs 1 process | collective MB/step |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['family']} | {r['cms'] or '-'} | {r['layout']} | {r['ranks']} | {r['step_s']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_over_1_process']:.2f}x | "
                   f"{r['collective_bytes_per_step'] / 1e6:.2f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--families", nargs="+", default=["hope", "transformer"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel.json"))
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from harness import run_distributed
    # name, TP, PP, DP, ZeRO stage (PP runs 2 micro-batches per step: the pipeline needs >= PP in flight)
    layouts = [("1 process", 1, 1, 1, 0), ("TP2", 2, 1, 1, 0), ("PP2", 1, 2, 1, 1), ("DP2 ZeRO-1", 1, 1, 2, 1),
               ("DP2 ZeRO-2", 1, 1, 2, 2), ("DP2 ZeRO-3", 1, 1, 2, 3)]
    rows = []
    for family in args.families:
        variants = [("step levels 1,4", [1, 4]), ("step levels 1,1", [1, 1])] if family == "hope" else [("", [])]
        for vname, periods in variants:
            for lname, tp, pp, dp, zero in layouts:
                tree = tree_for(family, tp, pp, zero, periods, args.micro, args.seq)
                res = run_distributed(bench_layout, tp * pp * dp, tree, args.warmup, args.steps, timeout=900)
                total_bytes = sum(sum(r["bytes"].values()) for r in res)
                row = {"family": family, "cms": vname, "layout": lname, "ranks": tp * pp * dp,
                       "step_s": max(r["step_s"] for r in res),
                       "tokens_per_s": res[0]["tokens_per_step"] / max(r["step_s"] for r in res),
                       "collective_bytes_per_step": total_bytes,
                       "by_op": {k: sum(r["bytes"].get(k, 0) for r in res) for k in COLLECTIVES
                                 if any(k in r["bytes"] for r in res)}}
                rows.append(row)
                print(f"{family:12s} {vname:16s} {lname:12s} step {row['step_s']:.3f} s  "
                      f"{row['tokens_per_s']:8.0f} tok/s  {total_bytes / 1e6:8.3f} MB/step", flush=True)
    for row in rows:                              # the baseline: one process, same family and CMS levels
        base = next(r for r in rows if r["family"] == row["family"] and r["cms"] == row["cms"]
                    and r["layout"] == "1 process")
        row["tokens_per_s_over_1_process"] = row["tokens_per_s"] / base["tokens_per_s"]
    print()
    print(table(rows))
    meta = {"micro_batch_per_rank": args.micro, "seq_len": args.seq, "steps": args.steps, "warmup": args.warmup,
            "cores": os.cpu_count(), "note": "CPU, gloo, 2 shared cores (timings vary with other load); bytes: the payload "
                                 "of each collective on a group of > 1 rank, summed over ranks, per timed step"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
