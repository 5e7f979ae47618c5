"""Failure handling of the training loop (every layout): what a
non-finite loss leads to (``train.on_nan``), and fault injection for the tests of it."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path


def fault_steps(var: str) -> set:
    """Steps named in a fault-injection variable (``"3,5"``), for tests of failure handling."""
    raw = os.environ.get(var, "").strip()
    return {int(x) for x in raw.split(",") if x.strip()} if raw else set()


def maybe_kill(step: int, rank: int, run_dir: Path) -> None:
    """Fault injection (tests): ``NL_PRETRAIN_FAULT_KILL=<rank>:<step>`` SIGKILLs that rank once at
    that step (a marker file in the run directory makes it happen once per run directory)."""
    spec = os.environ.get("NL_PRETRAIN_FAULT_KILL", "")
    if not spec:
        return
    r, s = (int(x) for x in spec.split(":"))
    marker = run_dir / ".fault-kill-done"
    if r == rank and s == step and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {rank} killed at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def handle_nan(train_cfg, lr: float, step: int, loss: float, streak: int, rank: int, where: str = None) -> str:
    """What a non-finite step leads to under the train section's ``on_nan``: ``skip`` | ``rollback``,
    or a FloatingPointError (stop). ``lr``: the configured learning rate, named in the error.
    ``where``: the diagnosis of :func:`nl_pretrain.train.diagnostics.explain`, printed on its own line."""
    policy = train_cfg.on_nan
    what = f"loss is {loss}" if not math.isfinite(loss) else f"a gradient is non-finite (loss {loss})"
    detail = f"\n  {where}" if where else ""
    if policy == "stop" or streak > train_cfg.max_nan_steps:
        why = (f"{streak} non-finite steps in a row (train.max_nan_steps={train_cfg.max_nan_steps})"
               if policy != "stop" else "train.on_nan=stop")
        raise FloatingPointError(f"{what} at step {step}: {why}; lower --optim.lr (now {lr}), "
                                 f"check the data, or resume from a checkpoint with --train.resume=auto{detail}")
    if rank == 0:
        action = ("step skipped (weights, optimizer and CMS accumulators unchanged)" if policy == "skip"
                  else "rolling back to the latest checkpoint; the batches since are skipped")
        print(f"warning: {what} at step {step}: {action}{detail}", flush=True)
    return policy
