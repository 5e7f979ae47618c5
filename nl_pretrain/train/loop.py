"""The training loop, one for every layout: :func:`fit` over a train module.

:func:`fit` owns what does not depend on where the model lives: resume, the non-finite-loss policy
(``train.on_nan``), logging (metrics.jsonl, TensorBoard, progress), held-out evaluation, the
checkpoint cadence and the summary. What one step computes is the train module's
(:mod:`nl_pretrain.train.module`): :class:`~nl_pretrain.train.module.LocalModule` (model and
optimizer in one process, :func:`train`) or
:class:`~nl_pretrain.parallel.trainer.DistributedTrainer` (megatron-core tensor parallel + the
DeepSpeed engine, pipeline; :func:`~nl_pretrain.parallel.trainer.train_distributed`). Every layout
therefore logs the same metrics and runs the same checks.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from nl_pretrain.config import ConfigError, RunConfig, dump_config
from nl_pretrain.optim import lr_at
from nl_pretrain.train.flops import device_peak_tflops, flops_per_token


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which taskset / cgroups / SLURM narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):         # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """torch intra-op threads: ``threads``, or (0) the cores this process may use shared by the ranks
    of this node (``LOCAL_WORLD_SIZE``). torch's own default counts every core of the machine, which
    on an oversubscribed machine ran 20-30x slower than one thread."""
    n = threads or max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    return n


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    return torch.device(name)


def json_safe(value):
    """``value`` with every non-finite float replaced by None: the file stays valid JSON (no bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value, **kw) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kw)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (what the checkpoint a run resumes from has seen), so the
    replayed steps are written once; atomic (a crash leaves the old file or the new one). A torn last
    line (a crash mid-write) is dropped."""
    from nl_pretrain.train.rundir import write_text_atomic
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


class MetricsLog:
    """``metrics.jsonl`` (one JSON object a line, valid JSON: non-finite values are null) and TensorBoard.
    ``start_step``: the step the run starts at; later records of an earlier attempt are dropped."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
        except Exception as exc:  # tensorboard missing: metrics.jsonl still has everything
            print(f"warning: TensorBoard disabled ({exc})")

    def write(self, step: int, values: dict) -> None:
        self.file.write(dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a rollback to that step's checkpoint)."""
        self.file.close()
        truncate_metrics(self.path, step)
        self.file = open(self.path, "a")

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class _Log:
    """Rank 0 writes (metrics, progress bar, lines); other ranks keep quiet."""

    def __init__(self, cfg: RunConfig, main: bool, start_step: int):
        self.main, self.cfg = main, cfg
        self.metrics = self.bar = None
        if main:
            from tqdm import tqdm
            self.metrics = MetricsLog(Path(cfg.train.run_dir), start_step)
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not cfg.train.progress,
                            dynamic_ncols=True, unit="step")

    def write(self, step: int, values: dict) -> None:
        if self.main:
            self.metrics.write(step, values)

    def rewind(self, step: int) -> None:
        if self.main:
            self.metrics.rewind(step)

    def say(self, text: str) -> None:
        if self.main:
            self.bar.write(text) if self.cfg.train.progress else print(text, flush=True)

    def advance(self, n: int) -> None:
        if self.main:
            self.bar.update(n)

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.metrics.close()


def evaluate(module, make_val, n_batches: int) -> dict:
    """Held-out loss and perplexity over ``n_batches`` micro-batches (collective for engines)."""
    total, count = module.eval_sums(list(itertools.islice(make_val(), n_batches)))
    if count == 0:
        return {}
    val = total / count
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": count}


def fit(cfg: RunConfig, module) -> dict:
    """Train ``module`` (a train module, see :mod:`nl_pretrain.train.module`) for ``cfg.train.steps``."""
    from nl_pretrain.checkpoint.manager import Checkpointer
    from nl_pretrain.train.diagnostics import explain
    from nl_pretrain.train.faults import handle_nan, maybe_kill
    from nl_pretrain.train.rundir import write_text_atomic
    t = cfg.train
    main = module.rank == 0
    run_dir = Path(t.run_dir)
    ckpt = Checkpointer(cfg, module.access(), module.coords(), module.plan, module.layout_dict())
    step, data_state = 0, None
    if t.resume:
        path = ckpt.find(t.resume)
        if path is None:
            if main:
                print(f"resume: no complete checkpoint under {ckpt.root}; starting at step 0", flush=True)
        else:
            common = ckpt.load(path)
            step, data_state = common["step"], common["data"]
            if step > t.steps:              # preflight says so before the model is built; this is the last word
                raise ConfigError(f"the checkpoint to resume from ({path}) is at step {step}, beyond "
                                  f"--train.steps={t.steps}; pass --train.steps >= {step} or start a new run")
            if step == t.steps:
                if main:
                    print(f"this run is complete: {path} is at step {step} = train.steps; nothing to do "
                          f"(its files are left as they are)", flush=True)
                return {"finished": True, "steps": t.steps, "checkpoint": str(path), "losses": [],
                        "parameters": module.n_params, "nan_events": []}
            if main:
                note = "" if common["same_layout"] else f" (saved under {common['layout']}, now {module.describe()})"
                print(f"resumed from {path} at step {step}{note}", flush=True)
    data = module.data(data_state)
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
                         f"({data.vocab_size}); set --model.vocab_size={data.vocab_size}")
    tokens_per_step = module.global_batch * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, module.n_params, cfg.data.seq_len)
    peak = device_peak_tflops(module.device) * module.world
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        print(f"model {cfg.model.preset or cfg.model.family}: {module.n_params:,} parameters on "
              f"{module.device}; {data.description}", flush=True)
        print(f"{module.describe()}; run dir {run_dir}; {t.steps} steps x {tokens_per_step} tokens", flush=True)
    log = _Log(cfg, main, step)
    start = window = time.perf_counter()
    losses, window_steps, nan_streak, summary = [], 0, 0, {"parameters": module.n_params, "nan_events": []}
    while step < t.steps:
        maybe_kill(step, module.rank, run_dir)
        lr = lr_at(step, cfg.optim, t.steps)
        batches = [next(data.train) for _ in range(t.grad_accum)]
        loss = module.train_step(step, batches)
        if not module.last_step_finite:               # agreed over every rank
            nan_streak += 1
            where = explain(module, batches)          # a diagnostic re-run of this batch (only now)
            if handle_nan(t, cfg.optim.lr, step, loss, nan_streak, module.rank, where) == "rollback":
                ckpt.wait()
                path = ckpt.find("auto")
                if path is None:
                    raise FloatingPointError(f"loss is {loss} at step {step} and there is no checkpoint under "
                                             f"{ckpt.root} to roll back to")
                back = ckpt.load(path)["step"]
                summary["nan_events"].append({"step": step, "event": "rollback", "to_step": back})
                log.rewind(back)                # steps back+1.. are trained again: written once
                log.write(back, {"nan_event": "rollback", "loss": loss, "rolled_back_from": step + 1})
                log.advance(back - step)
                step = back                     # the data position stays: the batches since are skipped
                continue
            summary["nan_events"].append({"step": step, "event": "skip"})
            log.write(step + 1, {"nan_event": "skip", "loss": loss})
            log.advance(1)
            step += 1
            continue
        nan_streak = 0
        losses.append(loss)
        window_steps += 1
        step += 1
        log.advance(1)
        if step % t.log_every == 0 or step == t.steps:
            now = time.perf_counter()
            recent = losses[-max(1, min(window_steps, len(losses))):]
            tps = window_steps * tokens_per_step / max(now - window, 1e-9)
            rec = {"loss": sum(recent) / len(recent), "lr": lr, "grad_norm": module.last_grad_norm,
                   "tokens_per_s": tps, "tokens": step * tokens_per_step, "elapsed_s": now - start}
            if peak:
                rec["mfu"] = tps * fpt / (peak * 1e12)
            if data.skipped():
                rec["skipped_samples"] = data.skipped()
            log.write(step, rec)
            if main and t.progress:
                log.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            elif main:
                print(f"step {step}/{t.steps} loss {rec['loss']:.4f} lr {lr:.2e} tok/s {tps:,.0f}"
                      + (f" mfu {rec['mfu']:.1%}" if peak else ""), flush=True)
            window, window_steps = time.perf_counter(), 0
        if step % t.eval_every == 0 or step == t.steps:
            ev = evaluate(module, data.make_val, t.eval_batches)
            if ev:
                log.write(step, ev)
                summary.update(ev)
                log.say(f"step {step}: held-out loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:.2f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
            ckpt.save(step, step * tokens_per_step, data.state())
    log.close()
    summary.update({"final_loss": losses[-1] if losses else None, "steps": t.steps, "losses": losses,
                    "layout": module.describe(), "elapsed_s": time.perf_counter() - start})
    if cfg.checkpoint.save_final:
        ckpt.save(t.steps, t.steps * tokens_per_step, data.state())
        ckpt.wait()
        summary["checkpoint"] = str(ckpt.store.latest())
    ckpt.wait()
    summary["skipped_samples"] = data.skipped()
    if main:
        write_text_atomic(run_dir / "summary.json", dumps(summary, indent=2))
    return summary


def train(cfg: RunConfig) -> dict:
    """One process: train ``cfg``, holding its run directory (and checkpoint dir) for the whole run."""
    from nl_pretrain.train.module import LocalModule
    from nl_pretrain.train.preflight import RunFinished, preflight
    from nl_pretrain.train.rundir import RunDirLock, run_dirs
    try:
        preflight(cfg, world=1, is_launched=False)
    except RunFinished as done:
        print(str(done), flush=True)
        return {"finished": True, "steps": cfg.train.steps, "checkpoint": done.path, "losses": [], "nan_events": []}
    with RunDirLock(run_dirs(cfg)):      # a failed start removes the directories it created
        return fit(cfg, LocalModule(cfg))
