"""The single-process training loop: data -> model -> AdamW(+CMS step levels) -> logs, eval, checkpoint."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from nl_pretrain.config import RunConfig, dump_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import ModelOptimizer, lr_at
from nl_pretrain.train.data import build_data
from nl_pretrain.train.flops import device_peak_tflops, flops_per_token


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, batches, device, n_batches: int, autocast) -> dict:
    model.eval()
    total, count = 0.0, 0
    for i, b in enumerate(batches):
        if i >= n_batches:
            break
        labels = b["labels"].to(device)
        with autocast():
            logits = model(b["input_ids"].to(device), b["doc_ids"].to(device))
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    model.train()
    if count == 0:
        return {}
    val = total / count
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": count}


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception as exc:  # tensorboard missing: metrics.jsonl still has everything
            print(f"warning: TensorBoard disabled ({exc})")

    def write(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(cfg: RunConfig) -> dict:
    """One process: train ``cfg``, holding its run directory (and checkpoint dir) for the whole run."""
    from nl_pretrain.checkpoint.manager import check_checkpoint_config
    from nl_pretrain.train.rundir import RunDirLock, run_dirs
    check_checkpoint_config(cfg)
    with RunDirLock(run_dirs(cfg)):
        return _train(cfg)


def _train(cfg: RunConfig) -> dict:
    from nl_pretrain.checkpoint.manager import Checkpointer
    from nl_pretrain.checkpoint.state import LocalAccess
    from nl_pretrain.train.faults import fault_steps, handle_nan
    from nl_pretrain.train.rundir import write_text_atomic
    t_cfg = cfg.train
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    seed_everything(t_cfg.seed)
    device = pick_device(t_cfg.device)
    model = LanguageModel(cfg.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    ckpt = Checkpointer(cfg, LocalAccess(model, opt), {"rank": 0, "world": 1, "tp": 0, "tp_size": 1, "pp": 0,
                                                        "dp": 0, "dp_size": 1}, plan={})
    start_step, data_state = 0, None
    if t_cfg.resume:
        path = ckpt.find(t_cfg.resume)
        if path is None:
            print(f"resume: no complete checkpoint under {ckpt.root}; starting at step 0")
        else:
            common = ckpt.load(path)
            start_step, data_state = common["step"], common["data"]
            note = "" if common["same_layout"] else f" (saved under {common['layout']})"
            print(f"resumed from {path} at step {start_step}{note}")
    data = build_data(cfg, t_cfg.micro_batch_size, t_cfg.seed, state=data_state)
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
                         f"({data.vocab_size}); set --model.vocab_size={data.vocab_size}")
    run_dir = Path(t_cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))

    tokens_per_step = t_cfg.micro_batch_size * t_cfg.grad_accum * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
    peak = device_peak_tflops(device)
    bf16 = t_cfg.precision == "bf16"
    nan_steps = fault_steps("NL_PRETRAIN_FAULT_NAN_STEPS")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    print(f"model {cfg.model.preset or cfg.model.family}: {n_params:,} parameters on {device}; {data.description}")
    print(f"run dir {run_dir}; {t_cfg.steps} steps x {tokens_per_step} tokens")
    log = MetricsLog(run_dir)
    from tqdm import tqdm
    bar = tqdm(total=t_cfg.steps, initial=start_step, disable=not t_cfg.progress, dynamic_ncols=True, unit="step")
    summary = {"parameters": n_params, "nan_events": []}
    window_tokens, window_start, start = 0, time.perf_counter(), time.perf_counter()
    loss_hist = []
    step, nan_streak = start_step, 0
    while step < t_cfg.steps:
        lr = lr_at(step, cfg.optim, t_cfg.steps)
        step_loss = 0.0
        for j in range(t_cfg.grad_accum):
            b = next(data.train)
            with autocast():
                loss = model.loss(b["input_ids"].to(device), b["labels"].to(device), b["doc_ids"].to(device))
            if step in nan_steps and j == 0:     # fault injection (tests), once per step number
                nan_steps.discard(step)
                loss = loss * float("inf")
            (loss / t_cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / t_cfg.grad_accum
        if not math.isfinite(step_loss):
            nan_streak += 1
            opt.zero_grad()                       # nothing of this step reaches the weights
            action = handle_nan(cfg, step, step_loss, nan_streak, 0)
            if action == "rollback":
                path = ckpt.find("auto")
                if path is None:
                    raise FloatingPointError(f"loss is {step_loss} at step {step} and there is no checkpoint "
                                             f"under {ckpt.root} to roll back to")
                back = ckpt.load(path)["step"]
                summary["nan_events"].append({"step": step, "event": "rollback", "to_step": back})
                log.write(step + 1, {"nan_event": "rollback", "loss": step_loss, "rolled_back_to": back})
                bar.update(back - step)
                step = back
                continue
            summary["nan_events"].append({"step": step, "event": "skip"})
            log.write(step + 1, {"nan_event": "skip", "loss": step_loss})
            step += 1
            bar.update(1)
            continue
        nan_streak = 0
        grad_norm = opt.step(step, lr)
        opt.zero_grad()
        loss_hist.append(step_loss)
        window_tokens += tokens_per_step
        bar.update(1)
        step += 1
        if step % t_cfg.log_every == 0 or step == t_cfg.steps:
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            recent = loss_hist[-t_cfg.log_every:]
            rec = {"loss": sum(recent) / len(recent), "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": step * tokens_per_step,
                   "elapsed_s": now - start}
            if peak:
                rec["mfu"] = tps * fpt / (peak * 1e12)
            log.write(step, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            if not t_cfg.progress:
                print(f"step {step}/{t_cfg.steps} loss {rec['loss']:.4f} lr {lr:.2e} tok/s {tps:,.0f}"
                      + (f" mfu {rec['mfu']:.1%}" if peak else ""), flush=True)
            window_tokens, window_start = 0, time.perf_counter()
        if step % t_cfg.eval_every == 0 or step == t_cfg.steps:
            ev = evaluate(model, data.make_val(), device, t_cfg.eval_batches, autocast)
            if ev:
                log.write(step, ev)
                summary.update(ev)
                bar.write(f"step {step}: held-out loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:.2f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t_cfg.steps:
            ckpt.save(step, step * tokens_per_step, data.state())
    bar.close()
    summary.update({"final_loss": loss_hist[-1] if loss_hist else float("nan"), "steps": t_cfg.steps,
                    "losses": loss_hist, "elapsed_s": time.perf_counter() - start})
    if cfg.checkpoint.save_final:
        ckpt.save(t_cfg.steps, t_cfg.steps * tokens_per_step, data.state())
        ckpt.wait()
        summary["checkpoint"] = str(ckpt.store.latest())
    ckpt.wait()
    log.close()
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
