"""Checks of a training run that need no model, no process group and no file written.

:func:`preflight` runs before anything else does (``nl-pretrain train``, :func:`~nl_pretrain.train.loop.train`,
the Ray launcher's driver): the device, the memory implementation on it, the parallel layout against
the processes there are, the dataset (present, its ``seq_len`` and vocabulary), and the checkpoint to
resume from (present, complete, its step not beyond ``train.steps``). Each failure is a
:class:`~nl_pretrain.config.ConfigError` naming the value and the fix; a run whose checkpoint is at
``train.steps`` already raises :class:`RunFinished` (nothing to do, nothing touched).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from nl_pretrain.config import ConfigError, RunConfig


class RunFinished(Exception):
    """The checkpoint to resume from is at ``train.steps``: the run is complete; nothing was written."""

    def __init__(self, message: str, step: int, path: str):
        super().__init__(message)
        self.step, self.path = step, path


def launched() -> bool:
    """Started by a launcher that sets up the process group (torchrun, DeepSpeed, Ray, srun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_layout(cfg: RunConfig, world: int, is_launched: bool) -> None:
    """The parallel layout against ``world`` processes, before DeepSpeed or a process group exist."""
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline
    wants = [f"--parallel.{k}={v}" for k, v in (("tensor", p.tensor), ("pipeline", p.pipeline),
                                                 ("zero_stage", p.zero_stage)) if v != (0 if k == "zero_stage" else 1)]
    if not is_launched and world == 1 and wants:
        n = max(model_parallel, 2)
        raise ConfigError(
            f"{' '.join(wants)} needs a distributed launch (at least {n} processes: tensor {p.tensor} x "
            f"pipeline {p.pipeline} x data >= 1), and this is one plain process; run it with "
            f"`launch/local.sh -n {n} --config ... {' '.join(wants)}` (torchrun), or drop the option")
    if world % model_parallel:
        raise ConfigError(f"world size {world} is not a multiple of tensor x pipeline = {p.tensor} x {p.pipeline} "
                          f"= {model_parallel}; launch a multiple of {model_parallel} processes or change the layout")


def check_device(cfg: RunConfig) -> str:
    """The device type the run will use; the memory implementation must run there."""
    import torch
    name = cfg.train.device
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ConfigError("train.device=cuda but no CUDA device is visible here; use --train.device=cpu "
                          "(or auto), or run on a machine with a GPU")
    dev = "cuda" if name == "auto" and cuda else ("cpu" if name == "auto" else name)
    if cfg.model.memory_impl == "triton":
        from kernels.memory.dispatch import resolve_impl
        try:
            resolve_impl("triton", dev)
        except ValueError as exc:
            raise ConfigError(f"model.memory_impl=triton: {exc}") from None
    return dev


def check_data(cfg: RunConfig) -> None:
    """The dataset exists, was prepared for ``data.seq_len`` and fits ``model.vocab_size``."""
    d = cfg.data
    if d.dataset:
        from data_pipeline.manifest import verify_dataset
        if not Path(d.dataset).is_dir():
            raise ConfigError(f"data.dataset '{d.dataset}' does not exist; prepare it first with "
                              f"`nl-pretrain prepare-data --out {d.dataset} --seq-len {d.seq_len}` or leave "
                              f"data.dataset empty for the built-in byte corpus")
        try:      # every shard present with its size (the sha256 of each: data.verify=full, or verify-data)
            m = verify_dataset(d.dataset, full=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.dataset: {exc}") from None
        if m["seq_len"] != d.seq_len:
            raise ConfigError(f"data.seq_len ({d.seq_len}) differs from the dataset's seq_len ({m['seq_len']}) in "
                              f"{d.dataset}; set --data.seq_len={m['seq_len']} or prepare the data again")
        vocab = m["vocab_size"]
    else:
        from nl_pretrain.train.byte_corpus import VOCAB_SIZE as vocab
        if d.source != "default" and not Path(d.source).exists():
            raise ConfigError(f"data.source '{d.source}' does not exist; give a directory of .txt files, "
                              f"or 'default' (the Python standard library)")
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
                          f"({vocab}); set --model.vocab_size={vocab}")


def checkpoint_step(cfg: RunConfig) -> Optional[tuple]:
    """``(step, path)`` of the checkpoint a resume would start from (None: a fresh start). Cheap: the
    index and file sizes only; the loader verifies the checksums (``checkpoint.verify``)."""
    from nl_pretrain.checkpoint.manager import checkpoint_root
    from nl_pretrain.checkpoint.store import CheckpointStore
    resume = cfg.train.resume
    if not resume:
        return None
    if resume == "auto":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the run itself warns about skipped checkpoints, once
            store = CheckpointStore(checkpoint_root(cfg))
            found = _quiet(store.latest)
        if found is None:
            return None
        return int(store.index(found)["step"]), str(found)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such directory; use --resume auto (the newest complete "
                          f"checkpoint of this run) or a <run_dir>/checkpoints/step-XXXXXXXX directory")
    store = CheckpointStore(path.parent)
    problem = store.problem(path)
    if problem:
        raise ConfigError(f"--resume {resume}: not a usable checkpoint: {problem}. Resume from another one "
                          f"(--resume auto takes the newest intact checkpoint) or start a new run")
    return int(store.index(path)["step"]), str(path)


def check_steps(cfg: RunConfig, step: int, path: str) -> None:
    """A resume never writes a step number that is not the model's."""
    steps = cfg.train.steps
    if step > steps:
        raise ConfigError(f"the checkpoint to resume from ({path}) is at step {step}, beyond --train.steps={steps}; "
                          f"a resume continues to train.steps, it cannot go back: pass --train.steps >= {step}, or "
                          f"start a new run (another --train.run_dir)")
    if step == steps:
        raise RunFinished(f"this run is complete: {path} is at step {step} = train.steps; nothing to do (its files "
                          f"are left as they are). Pass a larger --train.steps to train on", step, path)


def preflight(cfg: RunConfig, world: Optional[int] = None, is_launched: Optional[bool] = None) -> None:
    """Every check that can fail before work starts (see the module docstring)."""
    from nl_pretrain.checkpoint.manager import check_checkpoint_config
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    check_checkpoint_config(cfg)
    check_layout(cfg, world, launched() if is_launched is None else is_launched)
    from nl_pretrain.config import resolve_token_periods     # CMS periods in tokens -> steps (or an error)
    resolve_token_periods(cfg, max(1, world // (cfg.parallel.tensor * cfg.parallel.pipeline)))
    check_device(cfg)
    check_data(cfg)
    found = checkpoint_step(cfg)
    if found is not None:
        check_steps(cfg, *found)


def _quiet(fn):
    """Call ``fn`` with stderr silenced (the store prints a line per skipped checkpoint)."""
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        return fn()
