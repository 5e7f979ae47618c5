"""Quality ladder: every family and every Table 6 switch trained on the same prepared data, for the
same tokens and seeds; held-out loss and perplexity per run (docs/MODEL.md, "Quality ladder").

    python bench/quality.py --suite tiny --seeds 0,1                  # the main job's settings, 12 x 2 runs
    python bench/quality.py --suite tiny --only hope,titans --seeds 2 # a part (results are merged)
    python bench/quality.py --suite small --only hope,hope_attention,transformer,titans,gated_deltanet
                                                                      # 4 layers, d = 192, 150 steps

Every run goes through the training loop of ``nl-pretrain train`` (nl_pretrain.train.loop.train) with
``--train.threads`` and writes its run directory under ``runs/quality/``. Runs of the same seed read the
same training batches (the data order is a function of the seed) and every run is evaluated on the
same held-out batches. Results are merged into ``bench/results/quality.json`` keyed by suite (with the
steps, micro-batch and lr where they differ from the suite's: ``suite_key``), run and seed, so a suite
can be run in parts (``--only``) and in parallel processes (one JSON write each), and a shorter run
never replaces one at the suite's settings.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine, write_json  # noqa: E402

FAMILIES = ["hope", "hope_attention", "transformer", "titans", "gated_deltanet"]
SWITCHES = ["dgd", "no_momentum", "no_retention", "no_cms", "static_k", "static_v", "adaptive_q"]
RUNS = FAMILIES + [f"hope+{s}" for s in SWITCHES]
# suite -> (model overrides on the <family>-tiny preset, default steps); the main job's optimiser settings.
# small: 3.1-3.8M parameters; 150 steps (307K tokens) keep a HOPE run near 10 minutes on one CPU core
SUITES = {
    "tiny": ({}, 300),
    "small": ({"n_layers": 4, "d_model": 192, "n_heads": 4}, 150),
}
MAIN_LR = 3e-3                     # configs/tiny_hope.yaml
MAIN_MICRO = 8                     # configs/tiny_hope.yaml: train.micro_batch_size


def suite_key(suite: str, lr: float, steps: int = 0, micro: int = MAIN_MICRO) -> str:
    """Where a run's result lives in the JSON (and its run directory): the suite at its own length and the
    main job's lr and batch, else ``<suite>[_<steps>steps][_micro<micro>][_lr<lr>]``, so a shorter or
    otherwise different run never replaces (or sits in one table with) a run of the suite's settings."""
    key = suite
    if steps and steps != SUITES[suite][1]:
        key += f"_{steps}steps"
    if micro != MAIN_MICRO:
        key += f"_micro{micro}"
    return key if lr == MAIN_LR else f"{key}_lr{lr:g}"


def run_config(name: str, suite: str, seed: int, steps: int, data: str, threads: int, lr: float, micro: int):
    from nl_pretrain.config import load_config
    family, _, switches = name.partition("+")
    preset = f"{family}-tiny" + (f"+{switches}" if switches else "")
    model, _ = SUITES[suite]
    over = [f"--model.preset={preset}", f"--data.dataset={data}", f"--optim.lr={lr}", "--optim.warmup_steps=30",
            f"--train.steps={steps}", f"--train.micro_batch_size={micro}", f"--train.seed={seed}",
            f"--train.threads={threads}", f"--train.eval_every={steps}", "--train.eval_batches=16",
            f"--train.log_every={max(1, steps // 10)}", "--train.progress=false", "--checkpoint.save_final=false",
            f"--train.run_dir=runs/quality/{suite_key(suite, lr, steps, micro)}/{name}-s{seed}",
            f"--data.seq_len={json.loads(Path(data, 'manifest.json').read_text())['seq_len']}"]
    over += [f"--model.{k}={v}" for k, v in model.items()]
    return load_config(str(ROOT / "configs" / "tiny_hope.yaml"), over)


def train_one(cfg) -> dict:
    import shutil
    from nl_pretrain.train.loop import train
    shutil.rmtree(cfg.train.run_dir, ignore_errors=True)      # a fresh run every time (no resume)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            s = train(cfg)
        error = None
    except FloatingPointError as exc:                          # stopped: too many non-finite steps in a row
        s, error = {}, str(exc).splitlines()[0]
    warnings = [line for line in log.getvalue().splitlines() if line.startswith(("warning: ", "  first", "  forward"))]
    return {"val_loss": s.get("val_loss"), "val_ppl": s.get("val_ppl"), "parameters": s.get("parameters"),
            "final_train_loss": s.get("final_loss"), "nan_steps": len(s.get("nan_events", [])), "stopped": error,
            "nan_warnings": warnings[:4], "wall_s": round(time.perf_counter() - t0, 1),
            "tokens": cfg.train.steps * cfg.train.micro_batch_size * cfg.data.seq_len}


def table(results: dict, suite: str) -> str:
    rows = results.get(suite, {})
    lines = [f"suite {suite}: held-out loss (perplexity) per seed; mean and spread (max - min) over seeds",
             f"{'run':<24}{'params':>11}  {'per seed':<44}{'mean':>8}{'spread':>8}  notes"]
    for name in RUNS:
        runs = rows.get(name)
        if not runs:
            continue
        vals = [r["val_loss"] for _, r in sorted(runs.items()) if r["val_loss"] is not None]
        seeds = "  ".join(f"s{s}: {r['val_loss']:.3f} ({r['val_ppl']:.0f})" if r["val_loss"] is not None
                          else f"s{s}: failed" for s, r in sorted(runs.items()))
        notes = "; ".join(sorted({(f"{r['nan_steps']} non-finite steps" if r["nan_steps"] else "") +
                                  (f" stopped: {r['stopped'][:60]}" if r["stopped"] else "") for r in runs.values()} - {""}))
        params = next((r["parameters"] for r in runs.values() if r["parameters"]), None)
        mean = f"{sum(vals) / len(vals):.3f}" if vals else "-"
        spread = f"{max(vals) - min(vals):.3f}" if len(vals) > 1 else "-"
        lines.append(f"{name:<24}{params or 0:>11,}  {seeds:<44}{mean:>8}{spread:>8}  {notes}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["tiny", "small", "all"], default="tiny")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0 = the suite's default: tiny 300, small 150)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds (at least two for a spread)")
    ap.add_argument("--only", default="", help=f"comma-separated runs (default all): {','.join(RUNS)}")
    ap.add_argument("--data", default="data/stdlib-4k", help="prepared dataset (nl-pretrain prepare-data)")
    ap.add_argument("--lr", type=float, default=MAIN_LR, help="results at another lr go under <suite>_lr<lr>")
    ap.add_argument("--micro", type=int, default=MAIN_MICRO, help="sequences per step (of the dataset's length); "
                    "another --steps or --micro goes under <suite>_<steps>steps_micro<micro>")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/quality.json")
    a = ap.parse_args(argv)
    only = [r for r in a.only.split(",") if r] or RUNS
    bad = [r for r in only if r not in RUNS]
    if bad:
        print(f"error: --only {bad[0]} is not a run; choose from {','.join(RUNS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds {a.seeds!r} must be comma-separated integers, e.g. --seeds 0,1", file=sys.stderr)
        return 2
    if not Path(a.data, "manifest.json").exists():
        print(f"error: --data {a.data} is not a prepared dataset (no manifest.json); run nl-pretrain prepare-data "
              f"--out {a.data} --vocab-size 4096 --seq-len 256", file=sys.stderr)
        return 2
    suites = ["tiny", "small"] if a.suite == "all" else [a.suite]
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    for suite in suites:
        steps = a.steps or SUITES[suite][1]
        for name in only:
            for seed in seeds:
                cfg = run_config(name, suite, seed, steps, a.data, a.threads, a.lr, a.micro)
                res = train_one(cfg)
                res.update(steps=steps, lr=a.lr, micro=a.micro, seq_len=cfg.data.seq_len, load=load_average(),
                           context_target_norm=cfg.model.context_target_norm,
                           proj_target_match=cfg.model.proj_target_match)
                # merge into the file as it is now (other parts may have written meanwhile)
                results = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
                key = suite_key(suite, a.lr, steps, a.micro)
                results.setdefault("runs", {}).setdefault(key, {}).setdefault(name, {})[str(seed)] = res
                results["machine"] = machine(a.threads)
                results["suites"] = {s: {"model_overrides": SUITES[s][0], "preset": "<family>-tiny[+switch]"}
                                     for s in SUITES}
                write_json(a.out, results)
                v = res["val_loss"]
                print(f"{suite} {name} seed {seed}: held-out loss "
                      f"{v:.4f} (ppl {res['val_ppl']:.1f})" if v is not None and math.isfinite(v) else
                      f"{suite} {name} seed {seed}: no held-out loss ({res['stopped']})",
                      f"{res['wall_s']:.0f} s, {res['nan_steps']} non-finite steps", flush=True)
    results = json.loads(Path(a.out).read_text())
    for suite in suites:
        print(table(results["runs"], suite_key(suite, a.lr, a.steps or SUITES[suite][1], a.micro)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
