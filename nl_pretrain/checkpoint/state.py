"""What a checkpoint holds, written so that any layout can read it (docs/CHECKPOINT.md).

Every parameter is stored under its name in the single-device :class:`~nl_pretrain.model.LanguageModel`
as a record ``{"value", <optimizer state>...[, "acc"]}`` of fp32 tensors: the parameter (the fp32
master copy where one exists), the state its optimizer keeps for it (AdamW: ``exp_avg``,
``exp_avg_sq``; the matrix rules: ``optim/rules.py: STATE_KEYS``, keys starting with ``rep:`` are
whole-matrix tensors replicated over tensor ranks and never sliced), and for a slow CMS step level
its accumulated gradient. ``counters["optimizer"]`` names the optimizer; resuming under another one
is refused unless ``optim.allow_switch`` (:func:`check_optimizer_switch`). A record is one tensor-parallel shard, full across data parallelism (ZeRO partitions are
gathered when saving and scattered when loading), saved by one data-parallel rank (records are dealt
round-robin over the DP ranks, so they all write). Each shard file also holds the tensor-parallel
plan (``(style, dim)`` per sharded name) and its tensor rank, so a reader with another TP size
concatenates the pieces and takes its own slice; pipeline stages find their blocks by name. Optimizer
step counts (AdamW bias correction) are counters; the data position is the loader's global state.

The accumulator of a slow level is saved as the mean over the DP ranks (what their next update
all-reduces to), so any layout can continue it; each rank's own accumulator and random generators
go to its ``local-{rank}.pt``, which only the same layout restores (bitwise resume).

Files: ``shard-tp{t}-pp{p}-dp{d}.pt`` (records), ``local-{rank}.pt``, ``common.pt`` (rank 0: step,
tokens, counters, data state, config).
"""
from __future__ import annotations

import json

import random
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

FORMAT = "nl-pretrain-state/1"
MOMENTS = ("exp_avg", "exp_avg_sq")      # AdamW; other optimizers: optim/rules.py STATE_KEYS
REPLICATED = "rep:"                      # whole-matrix state, the same on every tensor rank: never sliced


def shard_file(tp: int, pp: int, dp: int) -> str:
    return f"shard-tp{tp:03d}-pp{pp:03d}-dp{dp:05d}.pt"


def local_file(rank: int) -> str:
    """Per-rank state that only the same layout can use: RNG, this rank's own CMS accumulators."""
    return f"local-{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    from nl_pretrain.parallel.random import get_rng_state
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "tp_streams": get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict) -> None:
    from nl_pretrain.parallel.random import set_rng_state
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    set_rng_state(state.get("tp_streams"))


# --------------------------------------------------------------------------------- optimizer access
def scalar_step(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def optimizer_steps(opt: torch.optim.Optimizer) -> int:
    return int(max((float(st["step"]) for st in opt.state.values() if "step" in st), default=0))


def set_optimizer_steps(opt: torch.optim.Optimizer, n: int) -> None:
    for st in opt.state.values():
        if "step" in st:
            st["step"] = scalar_step(n).to(st["step"].device) if torch.is_tensor(st["step"]) else n


class ParamAccess:
    """Read and write the records of the parameters one rank holds.

    ``named``: every ``(global name, parameter)`` on this rank; ``owners``: the ones this rank's
    tensor/pipeline coordinates save (not the copy of a tied weight on a later stage, not a
    tensor-replicated parameter on a tensor rank > 0). ``read``/``write`` may be collective over the
    data-parallel group: every DP rank calls them for the same names in the same order.
    """

    named: List[Tuple[str, torch.nn.Parameter]]

    def owners(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return self.named

    def read(self, name: str, p) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def write(self, name: str, p, rec: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def counters(self) -> dict:
        raise NotImplementedError

    def set_counters(self, counters: dict) -> None:
        raise NotImplementedError

    def local_state(self) -> dict:
        """State of this rank only (restored only under the same layout)."""
        return {}

    def set_local_state(self, state: dict) -> None:
        pass


def state_keys(opt, p) -> tuple:
    """The per-parameter state tensors ``opt`` keeps for ``p``: AdamW's two moments, or what the
    parameter's rule keeps (:data:`nl_pretrain.optim.rules.STATE_KEYS`)."""
    if hasattr(opt, "state_keys"):
        return opt.state_keys(opt_group(opt, p))
    return MOMENTS


def opt_group(opt, p) -> dict:
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise KeyError("parameter not in the optimizer")


def _fresh(opt, p) -> dict:
    if hasattr(opt, "fresh_state"):
        return opt.fresh_state(opt_group(opt, p), p)
    return {"step": scalar_step(0), **{k: torch.zeros_like(p) for k in MOMENTS}}


def read_plain(p, opt, acc=None) -> dict:
    st = opt.state.get(p) or {}
    rec = {"value": p.detach().float().clone()}
    keys = state_keys(opt, p)
    fresh = None if all(k in st for k in keys) else _fresh(opt, p)
    for k in keys:
        rec[k] = (st[k] if k in st else fresh[k]).detach().float().clone()
    if acc is not None:
        rec["acc"] = acc.detach().clone()
    return rec


def write_plain(p, opt, rec: dict, acc=None) -> None:
    """``rec`` into ``p`` and its optimizer state; a state tensor the record lacks (a checkpoint of
    another optimizer) starts fresh."""
    with torch.no_grad():
        p.copy_(rec["value"].to(p.dtype))
    st = opt.state.get(p)
    fresh = _fresh(opt, p)
    if not st:
        st = opt.state[p] = {"step": fresh["step"]}
    for k in state_keys(opt, p):
        src = rec[k] if k in rec else fresh[k]
        st[k] = src.to(device=p.device, dtype=p.dtype).clone()
    if acc is not None:
        acc.copy_(rec["acc"] if "acc" in rec else torch.zeros_like(acc))


def level_optimizers(optim_cfg, cms_levels) -> Dict[str, str]:
    """``{level index: optimizer}`` of the CMS step levels whose optimizer differs from ``optim.name``."""
    return {str(i): lvl.optimizer for i, lvl in enumerate(cms_levels)
            if lvl.kind == "step" and lvl.optimizer and lvl.optimizer != optim_cfg.name}


def _describe_levels(levels: Dict[str, str]) -> str:
    return ", ".join(f"model.cms[{i}].optimizer={n}" for i, n in sorted(levels.items())) or "no level optimizers"


def check_optimizer_switch(saved_counters: dict, optim_cfg, access: "ParamAccess", cms_levels=()) -> bool:
    """Refuse a checkpoint of another optimizer (the run's ``optim.name`` or a CMS step level's own
    ``optimizer``) unless ``optim.allow_switch``; then every parameter's optimizer state starts fresh
    (values and CMS accumulators kept). True when it switched."""
    saved = saved_counters.get("optimizer", "adamw")        # checkpoints before issue 14: AdamW
    saved_levels = saved_counters.get("level_optimizers", {})
    levels = level_optimizers(optim_cfg, cms_levels)
    if saved == optim_cfg.name and saved_levels == levels:
        return False
    if not optim_cfg.allow_switch:
        if saved != optim_cfg.name:
            raise ValueError(f"the checkpoint was trained with optim.name={saved}, this run asks for "
                             f"optim.name={optim_cfg.name}: resume with --optim.name={saved}, or pass "
                             f"--optim.allow_switch=true to continue the weights with fresh {optim_cfg.name} state")
        raise ValueError(f"the checkpoint's CMS step levels were trained with {_describe_levels(saved_levels)}, "
                         f"this run asks for {_describe_levels(levels)}: resume with the checkpoint's level "
                         f"optimizers, or pass --optim.allow_switch=true to continue the weights with fresh "
                         f"optimizer state")
    for n, p in sorted(access.named, key=lambda np_: np_[0]):     # the same order on every rank
        rec = access.read(n, p)
        access.write(n, p, {k: v for k, v in rec.items() if k in ("value", "acc")})
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        old = saved + ("" if not saved_levels else f" ({_describe_levels(saved_levels)})")
        new = optim_cfg.name + ("" if not levels else f" ({_describe_levels(levels)})")
        print(f"resume: optimizer switched from {old} (checkpoint) to {new}: weights kept, "
              f"optimizer moments and step counts start fresh", flush=True)
    return True


class LocalAccess(ParamAccess):
    """One process: :class:`~nl_pretrain.optim.ModelOptimizer` (every-step AdamW + slow levels)."""

    def __init__(self, model, opt):
        self.opt = opt
        self.named = list(model.named_parameters())
        self.slot = {}                                  # id(p) -> (torch optimizer, accumulator or None)
        for p in (p for g in opt.base.param_groups for p in g["params"]):
            self.slot[id(p)] = (opt.base, None)
        for lv in opt.slow.values():
            for p, a in zip(lv["params"], lv["acc"]):
                self.slot[id(p)] = (lv["opt"], a)

    def read(self, name, p):
        o, acc = self.slot[id(p)]
        return read_plain(p, o, acc)

    def write(self, name, p, rec):
        o, acc = self.slot[id(p)]
        write_plain(p, o, rec, acc)

    def counters(self):
        return {"adam_steps": optimizer_steps(self.opt.base), "optimizer": self.opt.cfg.name,
                "level_optimizers": level_optimizers(self.opt.cfg, self.opt.cms_levels),
                "slow_updates": {i: optimizer_steps(lv["opt"]) for i, lv in self.opt.slow.items()}}

    def set_counters(self, c):
        if check_optimizer_switch(c, self.opt.cfg, self, self.opt.cms_levels):
            c = {"adam_steps": 0, "slow_updates": {}}
        set_optimizer_steps(self.opt.base, c["adam_steps"])
        for i, lv in self.opt.slow.items():
            set_optimizer_steps(lv["opt"], c["slow_updates"].get(i, c["slow_updates"].get(str(i), 0)))


# ------------------------------------------------------------------------------- save and assemble
def collect_records(access: ParamAccess, dp_rank: int = 0, dp_size: int = 1) -> Dict[str, dict]:
    """This rank's share of the records: every DP rank reads every owned record (the reads may be
    collective), keeps those dealt to it (``i % dp_size == dp_rank``)."""
    mine = {}
    for i, (name, p) in enumerate(sorted(access.owners(), key=lambda np_: np_[0])):
        rec = access.read(name, p)
        if i % dp_size == dp_rank:
            mine[name] = rec
    return mine


def snapshot(access: ParamAccess) -> Tuple[Dict[str, dict], dict]:
    """Every record this rank holds, in memory (for an in-memory rollback of one step)."""
    records = {n: access.read(n, p) for n, p in sorted(access.named, key=lambda np_: np_[0])}
    return records, access.counters(), access.local_state()


def restore(access: ParamAccess, snap) -> None:
    records, counters, local = snap
    for n, p in sorted(access.named, key=lambda np_: np_[0]):
        access.write(n, p, records[n])
    access.set_counters(counters)
    access.set_local_state(local)


class Assembler:
    """The records of a checkpoint, sliced for a reader's tensor-parallel rank and size."""

    def __init__(self, shards: List[dict]):
        self.pieces: Dict[str, Dict[int, dict]] = {}
        self.plan: Dict[str, Tuple[str, int]] = {}
        self.saved_tp = 1
        for sh in shards:
            self.saved_tp = sh["tp_size"]
            self.plan.update({k: tuple(v) for k, v in sh["plan"].items()})
            for name, rec in sh["records"].items():
                self.pieces.setdefault(name, {})[sh["tp_rank"]] = rec

    def names(self) -> List[str]:
        return sorted(self.pieces)

    def full(self, name: str) -> dict:
        """The record of the whole tensor (tensor-parallel pieces concatenated)."""
        pieces = self.pieces[name]
        if name not in self.plan or self.saved_tp == 1:
            return pieces[min(pieces)]
        missing = [t for t in range(self.saved_tp) if t not in pieces]
        if missing:
            raise KeyError(f"{name}: the checkpoint lacks tensor-parallel pieces {missing}")
        dim = self.plan[name][1]
        return {k: pieces[0][k] if k.startswith(REPLICATED) else torch.cat([pieces[t][k] for t in range(self.saved_tp)], dim)
                for k in pieces[0]}

    def local(self, name: str, tp_rank: int, tp_size: int, dim: Optional[int]) -> dict:
        """This rank's slice: the saved piece when the TP size is unchanged, else a slice of the whole."""
        if name not in self.pieces:
            raise KeyError(f"the checkpoint has no parameter '{name}'")
        if dim is None:
            return self.full(name)
        if tp_size == self.saved_tp and tp_rank in self.pieces[name] and name in self.plan:
            return self.pieces[name][tp_rank]
        whole = self.full(name)
        return {k: v if k.startswith(REPLICATED) else v.narrow(dim, tp_rank * (v.shape[dim] // tp_size), v.shape[dim] // tp_size)
                for k, v in whole.items()}


# Model keys added after checkpoints existed, with the behaviour a checkpoint written before the key
# was trained with (not the key's current default: context_target_norm was added off, later made the
# default). A checkpoint without the key compares as that value, so a run can resume it by setting it.
BEFORE_THE_KEY = {"retention": True, "projection_memories": ["k", "v", "eta", "alpha"], "value_norm": False,
                  "recompute_chunks": False, "context_target_norm": False, "proj_target_match": False}


def model_config_diff(saved: dict, current) -> List[str]:
    """What differs between the checkpoint's model config and this run's. A CMS level's ``optimizer``
    is optimizer state, not the model: :func:`check_optimizer_switch` decides about it. A key of
    :data:`BEFORE_THE_KEY` that the checkpoint lacks compares as the behaviour it was written with."""
    def model_only(tree):
        tree = dict(tree)
        if isinstance(tree.get("cms"), list):
            tree["cms"] = [{k: v for k, v in lvl.items() if k != "optimizer"} for lvl in tree["cms"]]
        return tree
    older = {k: v for k, v in BEFORE_THE_KEY.items() if k not in saved}
    saved, now = model_only({**older, **saved}), model_only(asdict(current))
    keys = sorted(set(saved) | set(now))

    def line(k):
        if k not in older:
            return f"model.{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
        v = older[k]
        flag = str(v).lower() if isinstance(v, bool) else f"'{json.dumps(v)}'" if isinstance(v, list) else v
        return (f"model.{k}: {v!r} in the checkpoint (written before the key existed), {now.get(k)!r} now; "
                f"resume it with --model.{k}={flag}")
    return [line(k) for k in keys if saved.get(k) != now.get(k)]


def load_records(access: ParamAccess, assembler: Assembler, tp_rank: int, tp_size: int,
                 plan: Dict[str, Tuple[str, int]]) -> None:
    """Write every parameter this rank holds from the checkpoint (collective for ZeRO-3)."""
    for name, p in sorted(access.named, key=lambda np_: np_[0]):
        dim = plan[name][1] if name in plan and tp_size > 1 else None
        rec = assembler.local(name, tp_rank, tp_size, dim)
        for k, v in rec.items():
            if (k != "acc" and not k.startswith(REPLICATED) and tuple(v.shape) != tuple(p.shape)
                    and not hasattr(p, "ds_id")):
                raise ValueError(f"checkpoint record {name}.{k} has shape {tuple(v.shape)}, the model "
                                 f"{tuple(p.shape)}: the model config differs from the checkpoint's")
        access.write(name, p, rec)


def pick_latest(store, comm, rank: int, resume: str) -> Optional[str]:
    """Rank 0 picks the checkpoint (``auto``: the newest complete one; else a path) and tells all."""
    from pathlib import Path
    choice = None
    if rank == 0:
        if resume == "auto":
            found = store.latest()
            choice = str(found) if found is not None else None
        else:
            if not Path(resume, "index.json").is_file():
                choice = ("error", f"--resume {resume}: not a complete checkpoint directory (no index.json); "
                                   f"use --resume auto or a step-XXXXXXXX directory")
            else:
                choice = str(Path(resume))
    choice = comm.broadcast_object(choice, src=0)
    if isinstance(choice, tuple):
        raise FileNotFoundError(choice[1])
    return choice

