"""Peak host memory (RSS) of one rank at start-up: shards built in place vs the full model on every rank.

    .venv/bin/python bench/startup_memory.py [--ranks 1 2 4] [--layers 2] [--layouts tp zero3]

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

``--layouts zero3``: the same model data-parallel n ways under ZeRO-3 (TP1), where in place means
each root (embedding, block, norm, head) partitioned over DP as soon as it is built; a third mode,
``share first`` (the start-up before that: the rank's whole share built in place, then partitioned
by ``deepspeed.initialize``), is measured in the same run. Held parameters under ZeRO-3: this rank's
partition elements. ZeRO-3 rows also give the peak RSS when ``deepspeed.initialize`` is entered (the
shards built, before the engine allocates its own buffers), in place and share first.
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


def _tree(tp: int, layers: int, zero: int = 0) -> dict:
    return {"model": {"preset": "hope-1.3b", "n_layers": layers},
            "data": {"seq_len": 64},
            "train": {"micro_batch_size": 1, "grad_accum": 1, "seed": 0, "threads": 1, "progress": False},
            "parallel": {"tensor": tp, "pipeline": 1, "zero_stage": zero}}


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def start_rank(tree: dict, mode: str) -> dict:
    """One rank's start-up under ``mode`` ("in_place", "full_first" or, ZeRO-3, "share_first"); its
    peak RSS before and after."""
    import torch
    from nl_pretrain.config import build_config
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.parallelize import parallelize
    from nl_pretrain.parallel.topology import init_parallel
    cfg = build_config(tree)
    layout = init_parallel(cfg)
    before = _peak_rss()
    torch.manual_seed(cfg.train.seed)
    if mode in ("in_place", "share_first"):
        with torch.device("meta"):
            model = LanguageModel(cfg.model)
    else:
        model = LanguageModel(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    import deepspeed
    start, at_engine = deepspeed.initialize, {}

    def observed(*args, **kwargs):             # the peak of building the shards, before the engine starts
        at_engine["peak"] = _peak_rss()
        return start(*args, **kwargs)
    deepspeed.initialize = observed
    try:
        par = parallelize(model, cfg, layout, torch.device("cpu"), zero3_as_built=mode != "share_first")
    finally:
        deepspeed.initialize = start
    unique = {id(p): p for _, p in par.engine_named + par.slow.named_parameters()}    # engine + slow levels
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in unique.values())
    with open("/proc/self/statm") as f:                                     # resident pages now
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_before": before, "rss_peak": _peak_rss(), "rss_built": at_engine["peak"], "rss_after": now,
            "held_params": held,
            "model_params": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--layouts", nargs="+", choices=["tp", "zero3"], default=["tp", "zero3"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup_memory.json"))
    args = p.parse_args(argv)
    from common import load_average, machine, write_json
    from harness import run_distributed
    rows = []
    for kind in args.layouts:
        modes = ("in_place", "share_first", "full_first") if kind == "zero3" else ("in_place", "full_first")
        for n in args.ranks:
            tree = _tree(1, args.layers, zero=3) if kind == "zero3" else _tree(n, args.layers)
            row = {"ranks": n, "layout": f"DP{n} ZeRO-3" if kind == "zero3" else f"TP{n}", "kind": kind}
            for mode in modes:
                ranks = run_distributed(start_rank, n, tree, mode, timeout=1800)
                row[mode] = {"rank0_peak": ranks[0]["rss_peak"], "max_peak": max(r["rss_peak"] for r in ranks),
                             "rank0_before": ranks[0]["rss_before"], "held_params": ranks[0]["held_params"],
                             "max_after": max(r["rss_after"] for r in ranks),
                             "max_built": max(r["rss_built"] for r in ranks),
                             "model_params": ranks[0]["model_params"], "per_rank": ranks}
                print(f"{row['layout']} {mode}: rank-0 peak RSS {ranks[0]['rss_peak'] / MIB:,.0f} MiB", flush=True)
            row["ratio"] = row["in_place"]["max_peak"] / row["full_first"]["max_peak"]
            if "share_first" in row:
                row["ratio_share_first"] = row["in_place"]["max_peak"] / row["share_first"]["max_peak"]
                row["built_ratio_share_first"] = row["in_place"]["max_built"] / row["share_first"]["max_built"]
            rows.append(row)
    tables = []
    for kind in args.layouts:
        mine = [r for r in rows if r["kind"] == kind]
        base = mine[0]["in_place"]["max_peak"]
        z3 = kind == "zero3"
        lines = ["| ranks | params held per rank (fp32 MiB) | peak RSS in place (MiB) | vs 1 rank | RSS after start-up "
                 "in place | " + ("peak RSS share first (MiB) | in place / share first | peak RSS before the engine "
                                  "in place / share first (MiB) | ratio | " if z3 else "")
                 + "peak RSS full first (MiB) | in place / full first | RSS before the model (MiB) |",
                 "|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if z3 else "")]
        for r in mine:
            ip, ff = r["in_place"], r["full_first"]
            extra = ""
            if z3:
                sf = r["share_first"]
                extra = (f"{sf['max_peak'] / MIB:,.0f} | {r['ratio_share_first']:.2f}x | "
                         f"{ip['max_built'] / MIB:,.0f} / {sf['max_built'] / MIB:,.0f} | "
                         f"{r['built_ratio_share_first']:.2f}x | ")
            lines.append(f"| {r['ranks']} ({r['layout']}) | {ip['held_params']:,} of {ip['model_params']:,} "
                         f"({ip['held_params'] * 4 / MIB:,.0f}) | {ip['max_peak'] / MIB:,.0f} | "
                         f"{ip['max_peak'] / base:.2f}x | {ip['max_after'] / MIB:,.0f} | {extra}"
                         f"{ff['max_peak'] / MIB:,.0f} | {r['ratio']:.2f}x | {ip['rank0_before'] / MIB:,.0f} |")
        tables.append("\n".join(lines))
    table = "\n\n".join(tables)
    print(table)
    write_json(args.out, {"bench": "startup_memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                          "machine": machine(1), "load_average": load_average(),
                          "model": _tree(1, args.layers)["model"], "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
