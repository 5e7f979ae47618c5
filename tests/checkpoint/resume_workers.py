"""Per-rank functions the checkpoint tests spawn (real gloo processes through tests/parallel/harness)."""
from __future__ import annotations

import os

import torch

from nl_pretrain.config import build_config
from workers import tiny_tree, train_runs  # noqa: F401  (tests/parallel)


def with_checkpoints(tree: dict, run_dir: str, every: int = 0, **extra) -> dict:
    tree = dict(tree)
    tree["train"] = {**tree["train"], "run_dir": run_dir, "log_every": 1, **extra.pop("train", {})}
    tree["checkpoint"] = {"every": every, "keep_last": 0, **extra.pop("checkpoint", {})}
    return tree


def skip_probe(trees, nan_step: int):
    """Train up to ``nan_step`` (whose loss is made infinite) and one step more with the trainer API:
    the weights, moments, counters and CMS accumulators after the bad step equal those before it."""
    from megatron.core import parallel_state as ps
    from nl_pretrain.checkpoint.state import snapshot
    from nl_pretrain.parallel.trainer import DistributedTrainer, rank_batches
    os.environ["NL_PRETRAIN_FAULT_NAN_STEPS"] = str(nan_step)
    out = []
    for tree in trees:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        cfg = build_config(tree)
        trainer = DistributedTrainer(cfg)
        data = rank_batches(cfg, trainer.layout, trainer.dp_rank)
        losses, finite = [], []
        for step in range(nan_step + 2):
            if step == nan_step:
                before = snapshot(trainer.access())
                acc_before = [a.clone() for lv in trainer.slow.levels.values() for a in lv["acc"]]
            losses.append(trainer.train_step(step, [next(data) for _ in range(cfg.train.grad_accum)]))
            finite.append(trainer.last_step_finite)
            if step == nan_step:
                after = snapshot(trainer.access())
                acc_after = [a.clone() for lv in trainer.slow.levels.values() for a in lv["acc"]]
        same = all(torch.equal(before[0][n][k], after[0][n][k]) for n in before[0] for k in before[0][n])
        out.append({"losses": losses, "finite": finite, "unchanged": same, "counters": (before[1], after[1]),
                    "acc_unchanged": all(torch.equal(a, b) for a, b in zip(acc_before, acc_after)),
                    "n_acc": len(acc_before), "records": len(before[0])})
    return out


def failure_runs(skip_trees, rollback_tree, nan_step: int):
    """Fresh processes: the skip probes, then a full run that rolls back at ``nan_step``."""
    probes = skip_probe(skip_trees, nan_step)
    os.environ["NL_PRETRAIN_FAULT_NAN_STEPS"] = str(nan_step)
    return {"skip": probes, "rollback": train_runs([rollback_tree])[0]}


def busy_run(tree):
    """``train_distributed`` on a run directory that another process holds: the error on this rank."""
    from nl_pretrain.parallel.trainer import train_distributed
    from nl_pretrain.train.rundir import RunDirBusy
    os.environ["NL_PRETRAIN_LOCK_WAIT_S"] = "1"
    try:
        train_distributed(build_config(tree))
    except RunDirBusy as e:
        return str(e)
    return None
