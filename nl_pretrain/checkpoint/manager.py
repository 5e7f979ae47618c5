"""Save and resume a training run, one process or many (docs/CHECKPOINT.md).

:class:`Checkpointer` joins the content (:mod:`nl_pretrain.checkpoint.state`: layout-independent
records) and the disk (:mod:`nl_pretrain.checkpoint.store`: atomic, checksummed, per-rank files).
The single-process loop and the distributed trainer use the same class and the same format, so a
checkpoint of any layout resumes under any other and exports to one file.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from nl_pretrain.checkpoint.state import (FORMAT, Assembler, ParamAccess, capture_rng, collect_records,
                                          load_records, local_file, model_config_diff, pick_latest,
                                          restore_rng, shard_file)
from nl_pretrain.checkpoint.store import CheckpointError, CheckpointStore, LocalComm, TorchDistComm
from nl_pretrain.config import ConfigError, dump_config


def versions() -> dict:
    """Library versions recorded in every checkpoint (from package metadata: nothing is imported)."""
    from importlib import metadata
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for dist_name in ("nl-pretrain", "deepspeed", "megatron-core", "triton", "ray", "webdataset"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return out


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.run_dir) / "checkpoints"


def check_checkpoint_config(cfg) -> None:
    """What the checkpoint section means for the rest of the run (each field's bounds are declared
    with it in :mod:`nl_pretrain.config`)."""
    if cfg.train.on_nan == "rollback" and not cfg.checkpoint.every:
        raise ConfigError("train.on_nan=rollback needs periodic checkpoints to roll back to: set "
                          "--checkpoint.every=N (or use --train.on_nan=skip)")


class Checkpointer:
    """Save and load one rank's share of a run's state.

    ``coords``: ``dict(rank, world, tp, tp_size, pp, dp, dp_size)``; ``plan``: the tensor-parallel
    plan of the full model (:func:`nl_pretrain.parallel.tensor.shard_plan`).
    """

    def __init__(self, cfg, access: ParamAccess, coords: dict, plan: dict, layout: Optional[dict] = None):
        check_checkpoint_config(cfg)
        self.cfg, self.access, self.c, self.plan = cfg, access, coords, plan
        self.layout = layout or {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0}
        comm = TorchDistComm() if coords["world"] > 1 else LocalComm()
        self.comm = comm
        self.store = CheckpointStore(checkpoint_root(cfg), keep_last=cfg.checkpoint.keep_last,
                                     keep_every=cfg.checkpoint.keep_every, rank=coords["rank"],
                                     world=coords["world"], comm=comm, async_save=cfg.checkpoint.async_save,
                                     verify_on_latest=cfg.checkpoint.verify)

    @property
    def root(self) -> Path:
        return checkpoint_root(self.cfg)

    def save(self, step: int, tokens: int, data_state: dict) -> None:
        """Collective: every rank writes its part; the checkpoint appears complete or not at all."""
        c = self.c
        # fresh fp32 copies (gathered or cloned by the access), on the host: an async save writes
        # them as they are instead of copying them a second time
        records = {name: {k: t.cpu() for k, t in rec.items()}
                   for name, rec in collect_records(self.access, c["dp"], c["dp_size"]).items()}
        shard = shard_file(c["tp"], c["pp"], c["dp"])
        files = {shard: {"format": FORMAT, "records": records, "plan": {k: list(v) for k, v in self.plan.items()},
                         "tp_rank": c["tp"], "tp_size": c["tp_size"]},
                 local_file(c["rank"]): {"rng": capture_rng(), **self.access.local_state()}}
        meta = None
        if c["rank"] == 0:
            files["common.pt"] = {"format": FORMAT, "step": step, "tokens": tokens,
                                  "counters": self.access.counters(), "data": data_state,
                                  "config": dump_config(self.cfg), "model": asdict(self.cfg.model),
                                  "layout": self.layout, "versions": versions(), "tokenizer": self.tokenizer()}
            meta = {"format": FORMAT, "step": step, "tokens": tokens, "layout": self.layout,
                    "world": c["world"], "versions": versions()}
        self.store.save(step, files, meta, private=(shard,))

    def tokenizer(self) -> Optional[dict]:
        """The run's tokenizer, carried by every checkpoint so that inference decodes with it."""
        if not hasattr(self, "_tokenizer"):
            from nl_pretrain.infer.tokenizer import run_tokenizer_record
            self._tokenizer = run_tokenizer_record(self.cfg.data)
        return self._tokenizer

    def wait(self) -> None:
        self.store.wait()

    def find(self, resume: str) -> Optional[str]:
        """The checkpoint to resume from (``auto``: newest complete one, None if there is none).

        Whichever way it is named, rank 0 verifies it before anyone loads it (``checkpoint.verify``:
        ``full`` checks every file's sha256, ``size`` only sizes): ``auto`` skips a bad checkpoint with a
        warning, a named one that fails raises :class:`CheckpointError` on every rank, naming the file."""
        if resume == "auto":
            return pick_latest(self.store, self.comm, self.c["rank"], resume)
        verdict = None
        if self.c["rank"] == 0:
            path = Path(resume)
            if not path.is_dir():
                verdict = ("missing", f"--resume {resume}: no such directory; use --resume auto or a "
                                      f"<run_dir>/checkpoints/step-XXXXXXXX directory")
            else:
                problem = CheckpointStore(path.parent).problem(path, full=self.cfg.checkpoint.verify == "full")
                if problem:
                    verdict = ("corrupt", f"checkpoint {path} fails verification (checkpoint.verify="
                                          f"{self.cfg.checkpoint.verify}): {problem}. It was not loaded: resume "
                                          f"from an older checkpoint (--resume auto takes the newest intact one)")
        verdict = self.comm.broadcast_object(verdict, src=0)
        if verdict is not None:
            if verdict[0] == "missing":
                raise FileNotFoundError(verdict[1])
            raise CheckpointError(verdict[1] if self.c["rank"] == 0 else f"{verdict[1]} (reported by rank 0)")
        return str(Path(resume))

    def load(self, path: str) -> dict:
        """Collective: load ``path`` (verified by :meth:`find`) into this rank's model and optimizer;
        returns the common state (step, tokens, data, counters, ...)."""
        path = Path(path)
        common = self.store.read(path, "common.pt", verify=False)
        if common.get("format") != FORMAT:
            raise ValueError(f"{path}: format {common.get('format')!r}, this version reads {FORMAT!r}")
        diff = model_config_diff(common["model"], self.cfg.model)
        if diff:
            raise ConfigError(f"{path} was written for another model: " + "; ".join(diff)
                              + ". Resume with the checkpoint's model config (see its common.pt 'config')")
        index = self.store.index(path)
        shards = [self.store.read(path, name, verify=False) for name in sorted(index["files"])
                  if name.startswith("shard-")]
        load_records(self.access, Assembler(shards), self.c["tp"], self.c["tp_size"], self.plan)
        self.access.set_counters(common["counters"])
        same_layout = common["layout"] == self.layout and index.get("world") == self.c["world"]
        local = local_file(self.c["rank"])
        if same_layout and local in index["files"]:          # bitwise continuation of this very rank
            state = self.store.read(path, local, verify=False)
            restore_rng(state["rng"])
            self.access.set_local_state(state)
        common["same_layout"] = same_layout
        common["path"] = str(path)
        return common
