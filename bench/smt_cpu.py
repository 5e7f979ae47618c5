"""CPU benchmark of the self-modifying Titans layer and of a tiny training step.

    python bench/smt_cpu.py            # the full run (~3 minutes on 2 idle cores)
    python bench/smt_cpu.py --quick    # smoke run (~30 s)

(a) One ``SelfModifyingTitans`` layer (hope-tiny shapes: d_model 128, 4 heads, chunk 16, float32,
batch 1), forward + backward of ``out.sum()``: the chunk-parallel path ``layer(x)`` against the
token-by-token reference ``smt_sequential(layer, x)`` at T = 512 and 2048. the performance target (docs/KERNELS.md, "Targets") asks for
>= 10x at T = 2048.
(b) A whole training step (forward, backward, ``ModelOptimizer`` = AdamW + CMS step levels) of
``hope-tiny`` and ``transformer-tiny``, batch 8 x 256 tokens of random ids.

Tokens/s use the fastest of the timed repetitions, after warm-up (the median is kept too): on a
shared 2-core machine other processes only ever slow a repetition down, and with 2 OpenMP threads
a busy core can stretch one by 10x. The load average before and after is recorded with the
results. Prints a table and writes JSON (default bench/results/smt_cpu.json).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import load_average, machine, write_json  # noqa: E402
from nl_pretrain.config import OptimConfig, build_config  # noqa: E402
from nl_pretrain.model import LanguageModel  # noqa: E402
from nl_pretrain.model.smt import SelfModifyingTitans  # noqa: E402
from nl_pretrain.model.smt_reference import smt_sequential  # noqa: E402
from nl_pretrain.optim import ModelOptimizer  # noqa: E402

FULL = dict(lengths=(512, 2048), chunk_reps=7, ref_reps={512: 3, 2048: 2}, train_steps=8, train_warmup=2)
QUICK = dict(lengths=(128,), chunk_reps=2, ref_reps={128: 1}, train_steps=2, train_warmup=1)
TRAIN_BATCH, TRAIN_SEQ = 8, 256


def model_config(preset: str, vocab: int = 0):
    tree = {"model": {"preset": preset, "memory_impl": "torch"}}
    if vocab:
        tree["model"]["vocab_size"] = vocab
    return build_config(tree).model


def timed(fn, reps: int, warmup: int = 0) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def layer_rows(lengths, chunk_reps, ref_reps, seed: int) -> list:
    """Chunk-parallel vs sequential SMT layer, forward + backward, one row per (T, path)."""
    torch.manual_seed(seed)
    cfg = model_config("hope-tiny")
    layer = SelfModifyingTitans(cfg).float()
    rows = []
    for T in lengths:
        x = torch.randn(1, T, cfg.d_model)

        def chunked():
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        def sequential():
            layer.zero_grad(set_to_none=True)
            smt_sequential(layer, x).sum().backward()

        smoke = x[:, :2 * cfg.chunk_mem]          # warms the reference's code paths cheaply
        timed(lambda: smt_sequential(layer, smoke).sum().backward(), 1)
        for path, fn, reps, warm in (("chunk", chunked, chunk_reps, 1),
                                     ("sequential", sequential, ref_reps[T], 0)):
            secs = timed(fn, reps, warm)
            best = min(secs)
            rows.append(dict(path=path, T=T, batch=1, seconds=secs, best_s=best, median_s=statistics.median(secs),
                             tokens_per_s=T / best))
            print(f"  layer {path:10s} T={T:5d}: {best:8.3f} s  ({T / best:,.0f} tok/s)", flush=True)
    return rows


def train_rows(steps: int, warmup: int, vocab: int, seed: int) -> list:
    rows = []
    for preset in ("hope-tiny", "transformer-tiny"):
        torch.manual_seed(seed)
        cfg = model_config(preset, vocab)
        model = LanguageModel(cfg)
        opt = ModelOptimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), cfg.cms)
        ids = torch.randint(0, cfg.vocab_size, (TRAIN_BATCH, TRAIN_SEQ + 1))
        inputs, labels = ids[:, :-1], ids[:, 1:]
        state = {"step": 0}

        def step():
            loss = model.loss(inputs, labels)
            loss.backward()
            opt.step(state["step"], 1e-3)
            opt.zero_grad()
            state["step"] += 1

        secs = timed(step, steps, warmup)
        best = min(secs)
        tokens = TRAIN_BATCH * TRAIN_SEQ
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(dict(preset=preset, parameters=n_params, vocab=cfg.vocab_size, batch=TRAIN_BATCH,
                         seq=TRAIN_SEQ, seconds=secs, best_s=best, median_s=statistics.median(secs),
                         tokens_per_s=tokens / best))
        print(f"  train {preset:16s}: {best:8.3f} s/step  ({tokens / best:,.0f} tok/s)", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: T=128, a couple of steps")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary of the train-step models (0 = preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "smt_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    load_before = load_average()
    t0 = time.perf_counter()

    print(f"(a) SMT layer fwd+bwd, hope-tiny shapes, float32, {args.threads} threads", flush=True)
    layer = layer_rows(plan["lengths"], plan["chunk_reps"], plan["ref_reps"], args.seed)
    print(f"(b) train step, batch {TRAIN_BATCH} x {TRAIN_SEQ}", flush=True)
    train = train_rows(plan["train_steps"], plan["train_warmup"], args.vocab, args.seed)

    speedups = {}
    for T in plan["lengths"]:
        tps = {r["path"]: r["tokens_per_s"] for r in layer if r["T"] == T}
        speedups[T] = tps["chunk"] / tps["sequential"]
    train_ratio = train[0]["tokens_per_s"] / train[1]["tokens_per_s"]

    print("\n| measurement | tokens/s | ratio |")
    print("|---|---:|---:|")
    for T in plan["lengths"]:
        tps = {r["path"]: r["tokens_per_s"] for r in layer if r["T"] == T}
        print(f"| SMT layer T={T}, chunk-parallel | {tps['chunk']:,.0f} | {speedups[T]:.1f}x the sequential |")
        print(f"| SMT layer T={T}, sequential reference | {tps['sequential']:,.0f} | 1 |")
    for r in train:
        ratio = f"{train_ratio:.3f} of Transformer++" if r is train[0] else "1"
        print(f"| train step {r['preset']} | {r['tokens_per_s']:,.0f} | {ratio} |")
    if 2048 in speedups:
        verdict = "met" if speedups[2048] >= 10 else "NOT met"
        print(f"\ntarget (chunk >= 10x sequential at T=2048): {speedups[2048]:.1f}x, {verdict}")

    result = dict(machine=machine(args.threads), quick=args.quick, dtype="float32",
                  layer_config=dict(preset="hope-tiny", d_model=128, n_heads=4, chunk=16, memory_impl="torch"),
                  load_average_before=load_before, load_average_after=load_average(),
                  wall_s=time.perf_counter() - t0, layer=layer,
                  layer_speedup={str(T): s for T, s in speedups.items()}, train=train,
                  train_ratio_hope_over_transformer=train_ratio)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
