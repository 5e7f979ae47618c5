"""Benchmark of the data pipeline: preparation tokens/s with 1 and 2 Ray workers, loader samples/s.

    python bench/data.py                     # the stdlib corpus, vocab 32000, seq 256 (~2 min on 2 cores)
    python bench/data.py --max-documents 300 --vocab-size 4096      # quick

1. The tokenizer is trained once (its time is reported on its own: BPE training runs in the driver
   and does not scale with Ray workers).
2. The same corpus is prepared again with that tokenizer by 0 (in-process, no Ray), 1 and 2 Ray
   workers, each on a fresh local Ray cluster of that many CPUs. "tokens/s" is tokenize + pack +
   write (the Ray cluster start is reported separately); the outputs are checked to be identical.
3. The loader reads the train split at micro-batch 8 x seq 256 (what a training step consumes),
   with 0 and 2 DataLoader worker processes.
Prints a table and writes JSON (default bench/results/data.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data_pipeline import TokenLoader, prepare_dataset  # noqa: E402


def dataset_bytes(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "report.json"}


def bench_loader(dataset: str, batch: int, workers: int, batches: int) -> dict:
    loader = TokenLoader(dataset, "train", batch, seed=0, num_workers=workers)
    it = iter(loader)
    for _ in range(10):                                   # warm-up: worker start, page cache
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    samples = batches * batch
    return {"num_workers": workers, "micro_batch": batch, "seq_len": loader.seq_len, "batches": batches,
            "seconds": round(dt, 3), "samples_per_s": round(samples / dt, 1),
            "tokens_per_s": round(samples * loader.seq_len / dt, 1)}


def bench_train_step(dataset: str, batch: int, steps: int = 4) -> dict:
    """Samples/s that training the tiny HOPE preset consumes from this dataset (1 warm-up step)."""
    import torch
    from data_pipeline import TokenLoader
    from nl_pretrain.config import build_config
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.optim import ModelOptimizer
    loader = TokenLoader(dataset, "train", batch, seed=0)
    cfg = build_config({"model": {"preset": "hope-tiny", "vocab_size": loader.vocab_size},
                        "data": {"seq_len": loader.seq_len}})
    model = LanguageModel(cfg.model)
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    it = iter(loader)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        b = next(it)
        model.loss(b["input_ids"], b["labels"], b["doc_ids"]).backward()
        opt.step(i, cfg.optim.lr)
        opt.zero_grad()
    sps = steps * batch / (time.perf_counter() - start)
    return {"preset": "hope-tiny", "micro_batch": batch, "seq_len": loader.seq_len, "samples_per_s": sps,
            "tokens_per_s": sps * loader.seq_len}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-documents", type=int, default=0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--loader-batches", type=int, default=1000)
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "data.json"))
    ap.add_argument("--keep", help="keep the prepared datasets under this directory")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.keep or tempfile.mkdtemp(prefix="nl-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=args.vocab_size, seq_len=args.seq_len, max_documents=args.max_documents,
                  progress=False, overwrite=True)
    try:
        print(f"training the tokenizer (vocab {args.vocab_size}) on '{args.source}' ...", flush=True)
        m = prepare_dataset(args.source, str(work / "tok"), workers=0, **common)
        tok_path = str(work / "tok" / "tokenizer.json")
        result = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
                  "corpus": {"source": args.source, "documents": m["documents"]["documents"],
                             "raw_bytes": m["documents"]["raw_bytes"],
                             "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]},
                  "tokenizer": {"vocab_size": m["vocab_size"], "train_seconds": m["report"]["seconds"]["tokenizer"],
                                "train_bytes": m["tokenizer"]["training_bytes"]},
                  "prepare": [], "loader": []}
        ref = None
        for w in args.workers:
            print(f"preparing with {w} workers ...", flush=True)
            out = work / f"w{w}"
            r = prepare_dataset(args.source, str(out), workers=w, tokenizer_path=tok_path, **common)["report"]
            files = dataset_bytes(out)
            ref = ref or files
            result["prepare"].append({"workers": w, "executor": r["executor"], "tokens": r["tokens"],
                                      "ray_start_s": r["seconds"]["ray_start"],
                                      "seconds": r["seconds"]["tokenize_pack_write"],
                                      "tokens_per_s": r["tokens_per_s"],
                                      "mb_per_s": round(result["corpus"]["raw_bytes"] / 1e6
                                                        / r["seconds"]["tokenize_pack_write"], 2),
                                      "identical_to_first": files == ref})
        dataset = str(work / f"w{args.workers[-1]}")
        for lw in args.loader_workers:
            print(f"loader with {lw} worker processes ...", flush=True)
            result["loader"].append(bench_loader(dataset, args.micro_batch, lw, args.loader_batches))
        print("one tiny-HOPE train step per batch ...", flush=True)
        result["train_step"] = bench_train_step(dataset, args.micro_batch)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    result["host"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    c = result["corpus"]
    print(f"\nhost: {os.cpu_count()} CPUs, load average {result['host']['load_average_at_start'][0]} at start, "
          f"{result['host']['load_average_at_end'][0]} at end (other processes share the cores when > 0)")
    t = result["tokenizer"]
    print(f"\ncorpus '{c['source']}': {c['documents']} documents, {c['raw_bytes'] / 1e6:.1f} MB, {c['tokens']:,} "
          f"tokens; tokenizer vocab {t['vocab_size']} trained in {t['train_seconds']:.1f} s")
    print(f"\n{'prepare':<22}{'ray start s':>12}{'seconds':>10}{'tokens/s':>12}{'MB/s':>8}{'identical':>11}")
    for p in result["prepare"]:
        name = "in-process (no Ray)" if p["executor"] == "inline" else f"Ray, {p['workers']} worker(s)"
        print(f"{name:<22}{p['ray_start_s']:>12.1f}{p['seconds']:>10.1f}{p['tokens_per_s']:>12,.0f}"
              f"{p['mb_per_s']:>8.2f}{str(p['identical_to_first']):>11}")
    print(f"\n{'loader':<22}{'batch':>10}{'samples/s':>12}{'tokens/s':>12}")
    for lo in result["loader"]:
        name = f"{lo['num_workers']} DataLoader workers"
        print(f"{name:<22}{lo['micro_batch']:>5} x {lo['seq_len']:<4}{lo['samples_per_s']:>10,.0f}"
              f"{lo['tokens_per_s']:>12,.0f}")
    tr = result["train_step"]
    best = max(lo["samples_per_s"] for lo in result["loader"])
    print(f"{'train step hope-tiny':<22}{tr['micro_batch']:>5} x {tr['seq_len']:<4}{tr['samples_per_s']:>10,.1f}"
          f"{tr['tokens_per_s']:>12,.0f}   (the loader delivers {best / tr['samples_per_s']:,.0f}x what it consumes)")
    result["loader_over_train_step"] = best / tr["samples_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
