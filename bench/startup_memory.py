"""Peak host memory (RSS) of one rank at start-up: shards built in place vs the full model on every rank.

    .venv/bin/python bench/startup_memory.py [--ranks 1 2 4] [--layers 2]

Model: hope-1.3b cut to ``--layers`` blocks (d=2048, 8 heads, 32K vocabulary, untied head: wide and
few-layer, so the embedding, the head and the blocks all count). For each rank count n the model is
split tensor-parallel n ways (real processes over gloo, tests/parallel/harness.py) and every rank
runs :func:`~nl_pretrain.parallel.parallelize.parallelize` (the model, then the DeepSpeed engine with
its AdamW; the optimizer moments appear at the first step, after start-up) on
  * ``in place``: the model built on the meta device, each rank materialising only its share
    (nl_pretrain/parallel/materialize.py), what ``nl-pretrain train`` does;
  * ``full first`` (the baseline, the start-up before in-place shards): the whole single-device
    model built on every rank, then its share kept.
Per rank: peak RSS (``ru_maxrss``) after imports and the process group, and after start-up, and the
resident set right after start-up; the table reports the largest rank, and the ratio in place /
full first in the same run.
Writes bench/results/startup_memory.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parallel"))
sys.path.insert(0, str(ROOT))              # before bench/ (bench/kernels.py is not the kernels package)

MIB = 1024 ** 2


def _tree(tp: int, layers: int) -> dict:
    return {"model": {"preset": "hope-1.3b", "n_layers": layers},
            "data": {"seq_len": 64},
            "train": {"micro_batch_size": 1, "grad_accum": 1, "seed": 0, "threads": 1, "progress": False},
            "parallel": {"tensor": tp, "pipeline": 1, "zero_stage": 0}}


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def start_rank(tree: dict, mode: str) -> dict:
    """One rank's start-up under ``mode`` ("in_place" or "full_first"); its peak RSS before and after."""
    import torch
    from nl_pretrain.config import build_config
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.parallelize import parallelize
    from nl_pretrain.parallel.topology import init_parallel
    cfg = build_config(tree)
    layout = init_parallel(cfg)
    before = _peak_rss()
    torch.manual_seed(cfg.train.seed)
    if mode == "in_place":
        with torch.device("meta"):
            model = LanguageModel(cfg.model)
    else:
        model = LanguageModel(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    par = parallelize(model, cfg, layout, torch.device("cpu"))
    unique = {id(p): p for _, p in par.engine_named + par.slow.named_parameters()}    # engine + slow levels
    held = sum(p.numel() for p in unique.values())
    with open("/proc/self/statm") as f:                                     # resident pages now
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_before": before, "rss_peak": _peak_rss(), "rss_after": now, "held_params": held,
            "model_params": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup_memory.json"))
    args = p.parse_args(argv)
    from common import load_average, machine, write_json
    from harness import run_distributed
    rows = []
    for n in args.ranks:
        row = {"ranks": n, "layout": f"TP{n}"}
        for mode in ("in_place", "full_first"):
            ranks = run_distributed(start_rank, n, _tree(n, args.layers), mode, timeout=1800)
            row[mode] = {"rank0_peak": ranks[0]["rss_peak"], "max_peak": max(r["rss_peak"] for r in ranks),
                         "rank0_before": ranks[0]["rss_before"], "held_params": ranks[0]["held_params"],
                         "max_after": max(r["rss_after"] for r in ranks),
                         "model_params": ranks[0]["model_params"], "per_rank": ranks}
            print(f"TP{n} {mode}: rank-0 peak RSS {ranks[0]['rss_peak'] / MIB:,.0f} MiB", flush=True)
        row["ratio"] = row["in_place"]["max_peak"] / row["full_first"]["max_peak"]
        rows.append(row)
    base = rows[0]["in_place"]["max_peak"]
    lines = ["| ranks | params held per rank (fp32 MiB) | peak RSS in place (MiB) | vs 1 rank | RSS after start-up "
             "in place | peak RSS full first (MiB) | in place / full first | RSS before the model (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ip, ff = r["in_place"], r["full_first"]
        lines.append(f"| {r['ranks']} (TP{r['ranks']}) | {ip['held_params']:,} of {ip['model_params']:,} "
                     f"({ip['held_params'] * 4 / MIB:,.0f}) | {ip['max_peak'] / MIB:,.0f} | "
                     f"{ip['max_peak'] / base:.2f}x | "
                     f"{ip['max_after'] / MIB:,.0f} | {ff['max_peak'] / MIB:,.0f} | {r['ratio']:.2f}x | "
                     f"{ip['rank0_before'] / MIB:,.0f} |")
    table = "\n".join(lines)
    print(table)
    write_json(args.out, {"bench": "startup_memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                          "machine": machine(1), "load_average": load_average(),
                          "model": _tree(1, args.layers)["model"], "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
