"""Checkpoint size, save time (sync and async) and load time, against a plain torch.save baseline.

    python bench/checkpoint.py                   # hope-tiny and the ~100M HOPE (~1 minute on 2 idle cores)
    python bench/checkpoint.py --sizes tiny      # hope-tiny only (seconds)

Models: ``hope-tiny`` and ``hope-340m`` cut to 5 layers (95,269,664 parameters, the layer count
closest to 100M; 6 layers would be 107.8M). Before measuring, the optimizer takes one step per
step of the slowest CMS level's period (4 steps of batch 1 x 64 random ids), so the AdamW moments
of every level, the slow one included, exist: the checkpoint and the baseline then hold the same
tensors.

Per model, through :class:`~nl_pretrain.checkpoint.manager.Checkpointer` in single-process use:
  * size: every file of one checkpoint directory (bytes, and bytes per parameter);
  * sync save: ``save()`` + ``wait()`` with ``checkpoint.async_save=False``;
  * async save: the stall (``save()`` returns after the host copy) and ``wait()`` (the background
    write, measured with the caller idle), and the stall as a fraction of the sync save;
  * load: ``find("auto")`` with ``checkpoint.verify`` "full" (sha256 of every file) and "size",
    and ``load()``; the round trip is checked once (parameters zeroed, loaded back, compared);
  * the stall's main part, ``collect_records`` (fp32 copies of values and moments), and for
    comparison ``snapshot_to_host`` of those records: the second host copy the async path used to
    make and now skips (the records are private host copies already);
  * baseline: ``torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)``, the same
    with flush + fsync (the store fsyncs every file), and ``torch.load`` + ``load_state_dict``.
Every timing is the median of ``--reps`` repetitions (all are kept in the JSON); each save writes
into an empty directory, cleared outside the timed region. The checkpoints live in a temporary
directory under ``--tmp`` (deleted at the end); loads read files just written, so from the page
cache. Prints a markdown table and writes JSON (default bench/results/checkpoint.json).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import load_average, machine, write_json  # noqa: E402
from nl_pretrain.checkpoint.manager import Checkpointer  # noqa: E402
from nl_pretrain.checkpoint.state import LocalAccess, collect_records  # noqa: E402
from nl_pretrain.checkpoint.store import snapshot_to_host  # noqa: E402
from nl_pretrain.config import build_config  # noqa: E402
from nl_pretrain.model import LanguageModel  # noqa: E402
from nl_pretrain.optim import ModelOptimizer  # noqa: E402

MODELS = {"tiny": {"preset": "hope-tiny"},
          "100m": {"preset": "hope-340m", "n_layers": 5}}
COORDS = {"rank": 0, "world": 1, "tp": 0, "tp_size": 1, "pp": 0, "dp": 0, "dp_size": 1}
BATCH, SEQ = 1, 64
DATA_STATE = {"consumed_samples": 4 * BATCH, "seed": 0}


def timed(fn, reps: int, before=None) -> list:
    """Seconds of ``fn()``, ``reps`` times; ``before()`` runs untimed ahead of each repetition."""
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def stats(secs: list) -> dict:
    return {"seconds": secs, "median_s": statistics.median(secs)}


def build_trained(model_tree: dict, seed: int):
    """The model and optimizer after one step per step of the slowest CMS level's period."""
    torch.manual_seed(seed)
    cfg = build_config({"model": dict(model_tree)})
    model = LanguageModel(cfg.model)
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    for step in range(max(opt.periods)):
        ids = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ + 1))
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step(step, cfg.optim.lr)
        opt.zero_grad()
    missing = sum(1 for o in [opt.base] + [lv["opt"] for lv in opt.slow.values()]
                  for g in o.param_groups for p in g["params"] if "exp_avg" not in o.state.get(p, {}))
    if missing:
        raise RuntimeError(f"{missing} parameters have no AdamW moments after {max(opt.periods)} steps")
    return cfg, model, opt


def checkpointer(model_tree: dict, model, opt, root: Path, async_save: bool, verify: str) -> Checkpointer:
    cfg = build_config({"model": dict(model_tree),
                        "checkpoint": {"dir": str(root), "keep_last": 0, "async_save": async_save, "verify": verify}})
    return Checkpointer(cfg, LocalAccess(model, opt), COORDS, plan={})


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def bench_model(name: str, work: Path, reps: int, seed: int) -> dict:
    tree = MODELS[name]
    t0 = time.perf_counter()
    cfg, model, opt = build_trained(tree, seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {tree} {n_params:,} parameters, {max(opt.periods)} optimizer steps in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    row = {"name": name, "model": dict(tree), "parameters": n_params, "layers": cfg.model.n_layers,
           "d_model": cfg.model.d_model, "vocab": cfg.model.vocab_size}

    sync_root, async_root = work / f"{name}-sync", work / f"{name}-async"
    sync = checkpointer(tree, model, opt, sync_root, async_save=False, verify="full")
    row["sync_save"] = stats(timed(lambda: (sync.save(1, 0, DATA_STATE), sync.wait()), reps,
                                   before=lambda: clear(sync_root)))
    print(f"  sync save      {row['sync_save']['median_s']:8.3f} s", flush=True)

    ckpt_dir = sync.find("auto")
    files = {p.name: p.stat().st_size for p in sorted(Path(ckpt_dir).iterdir())}
    row["checkpoint_bytes"] = sum(files.values())
    row["checkpoint_files"] = files
    row["checkpoint_bytes_per_param"] = row["checkpoint_bytes"] / n_params

    asy = checkpointer(tree, model, opt, async_root, async_save=True, verify="full")
    stall, write = [], []

    def async_save():
        t = time.perf_counter()
        asy.save(1, 0, DATA_STATE)
        stall.append(time.perf_counter() - t)
        t = time.perf_counter()
        asy.wait()
        write.append(time.perf_counter() - t)

    timed(async_save, reps, before=lambda: clear(async_root))
    row["async_stall"], row["async_wait"] = stats(stall), stats(write)
    row["async_total"] = stats([s + w for s, w in zip(stall, write)])
    row["async_stall_over_sync"] = row["async_stall"]["median_s"] / row["sync_save"]["median_s"]
    clear(async_root)
    print(f"  async stall    {row['async_stall']['median_s']:8.3f} s, then wait {row['async_wait']['median_s']:.3f} s",
          flush=True)

    # the stall's main part (the fp32 records), and the copy of them that the async save no longer makes
    access = LocalAccess(model, opt)
    row["stall_collect_records"] = stats(timed(lambda: collect_records(access), reps))
    records = collect_records(access)
    row["stall_snapshot_to_host"] = stats(timed(lambda: snapshot_to_host(records), reps))

    by_verify = {v: checkpointer(tree, model, opt, sync_root, async_save=False, verify=v) for v in ("full", "size")}
    for verify, ck in by_verify.items():
        found = []
        row[f"find_{verify}"] = stats(timed(lambda: found.append(ck.find("auto")), reps))
        if found[-1] != ckpt_dir:
            raise RuntimeError(f"find('auto') with verify={verify} returned {found[-1]}, expected {ckpt_dir}")
    row["load"] = stats(timed(lambda: by_verify["size"].load(ckpt_dir), reps))
    row["roundtrip_ok"] = roundtrip_ok(model, by_verify["size"], ckpt_dir)
    print(f"  find full      {row['find_full']['median_s']:8.3f} s, size {row['find_size']['median_s']:.3f} s, "
          f"load {row['load']['median_s']:.3f} s, round trip {'ok' if row['roundtrip_ok'] else 'FAILED'}", flush=True)
    clear(sync_root)

    base = work / f"{name}-torch.pt"

    def torch_save():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, base)

    def torch_save_fsync():
        with open(base, "wb") as f:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    def torch_load():
        state = torch.load(base, map_location="cpu", mmap=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])

    row["torch_save"] = stats(timed(torch_save, reps, before=lambda: base.unlink(missing_ok=True)))
    row["torch_save_fsync"] = stats(timed(torch_save_fsync, reps, before=lambda: base.unlink(missing_ok=True)))
    row["torch_save_bytes"] = base.stat().st_size
    row["torch_load"] = stats(timed(torch_load, reps))
    base.unlink()
    row["sync_over_torch_save"] = row["sync_save"]["median_s"] / row["torch_save"]["median_s"]
    row["sync_over_torch_save_fsync"] = row["sync_save"]["median_s"] / row["torch_save_fsync"]["median_s"]
    row["bytes_over_torch_save"] = row["checkpoint_bytes"] / row["torch_save_bytes"]
    print(f"  torch.save     {row['torch_save']['median_s']:8.3f} s, with fsync "
          f"{row['torch_save_fsync']['median_s']:.3f} s, torch.load {row['torch_load']['median_s']:.3f} s", flush=True)
    return row


def roundtrip_ok(model, ck: Checkpointer, path: str) -> bool:
    """Zero every parameter, load the checkpoint, compare with the values before (untimed)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ck.load(path)
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def table(rows: list) -> str:
    def mb(b):
        return f"{b / 1e6:,.1f} MB"

    def s(r, key):
        x = r[key]["median_s"]
        return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"

    lines = [
        ("parameters", lambda r: f"{r['parameters']:,}"),
        ("checkpoint size (bytes/param)",
         lambda r: f"{mb(r['checkpoint_bytes'])} ({r['checkpoint_bytes_per_param']:.2f})"),
        ("torch.save size (ratio)", lambda r: f"{mb(r['torch_save_bytes'])} ({r['bytes_over_torch_save']:.3f}x)"),
        ("sync save (save + wait)", lambda r: s(r, "sync_save")),
        ("torch.save baseline", lambda r: s(r, "torch_save")),
        ("sync save / torch.save", lambda r: f"{r['sync_over_torch_save']:.2f}x"),
        ("torch.save + fsync", lambda r: s(r, "torch_save_fsync")),
        ("sync save / (torch.save + fsync)", lambda r: f"{r['sync_over_torch_save_fsync']:.2f}x"),
        ("async stall (save)", lambda r: s(r, "async_stall")),
        ("async write (wait)", lambda r: s(r, "async_wait")),
        ("async stall / sync save", lambda r: f"{r['async_stall_over_sync']:.2f}"),
        ("stall part: collect_records", lambda r: s(r, "stall_collect_records")),
        ("(skipped) second host copy of the records", lambda r: s(r, "stall_snapshot_to_host")),
        ("find('auto'), verify full", lambda r: s(r, "find_full")),
        ("find('auto'), verify size", lambda r: s(r, "find_size")),
        ("load", lambda r: s(r, "load")),
        ("torch.load + load_state_dict", lambda r: s(r, "torch_load")),
    ]
    head = "| measurement | " + " | ".join(f"{r['model']['preset']}, {r['layers']} layers" for r in rows) + " |"
    out = [head, "|---|" + "---:|" * len(rows)]
    out += [f"| {label} | " + " | ".join(fn(r) for r in rows) + " |" for label, fn in lines]
    return "\n".join(out)


def filesystem(path: str) -> dict:
    """The mount holding ``path`` (device and type): fsync times depend on it."""
    best = {}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, kind = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best.get("mount", "")):
                    best = {"device": dev, "mount": mnt, "type": kind}
    except OSError:
        pass
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,100m", help=f"comma-separated, of {', '.join(MODELS)} (default both)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per timing; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--tmp", default="/tmp", help="parent of the temporary checkpoint directory")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="if the 1-minute load average is above this, wait --load-wait s once before starting")
    p.add_argument("--load-wait", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "checkpoint.json"))
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in MODELS]
    if unknown or not sizes:
        p.error(f"--sizes {args.sizes!r}: unknown {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)

    load_first = load_average()
    waited = 0.0
    if load_first and load_first[0] > args.max_load:
        print(f"load average {load_first[0]} > {args.max_load}: waiting {args.load_wait:.0f} s once", flush=True)
        time.sleep(args.load_wait)
        waited = args.load_wait
    load_before = load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="nl-bench-checkpoint-", dir=args.tmp))
    try:
        rows = [bench_model(name, work, args.reps, args.seed) for name in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = load_average()

    print()
    print(table(rows))
    print(f"\nmedian of {args.reps}; {args.threads} threads on {os.cpu_count()} CPUs; load average {load_before} "
          f"before, {load_after} after (a shared machine: other processes slow repetitions down)")

    result = dict(machine=machine(args.threads), date=started.isoformat(timespec="seconds"),
                  note=(f"timings on a shared {os.cpu_count()}-core machine (another engineer's jobs may run); "
                        "loads read files just written (page cache); median of the repetitions"),
                  filesystem=filesystem(str(work)), tmp=args.tmp, reps=args.reps, batch=[BATCH, SEQ],
                  load_average_first=load_first, waited_s=waited, load_average_before=load_before,
                  load_average_after=load_after, wall_s=time.perf_counter() - t0, models=rows)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
