"""Checkpoint access to one rank of a DeepSpeed engine (:class:`~nl_pretrain.parallel.trainer.DistributedTrainer`):
the parameters DeepSpeed holds (plain AdamW, bf16 fp32 masters, ZeRO 1/2 fragments, ZeRO-3
partitions) and the slow CMS levels beside the engine, read and written as the layout-independent
records of :mod:`nl_pretrain.checkpoint.state`. Everything DeepSpeed-specific that checkpoints need
lives here, with the parallel code.
"""
from __future__ import annotations

import torch

from nl_pretrain.checkpoint.state import (MOMENTS, ParamAccess, check_optimizer_switch, level_optimizers,
                                          optimizer_steps, read_plain, scalar_step, set_optimizer_steps,
                                          write_plain)


def inner_torch_optimizer(opt):
    """The ``torch.optim`` optimizer inside DeepSpeed's wrappers (ZeRO, bf16) or ``opt`` itself."""
    while not (isinstance(opt, torch.optim.Optimizer)
               and type(opt).__module__.startswith(("torch.optim", "nl_pretrain.optim"))):
        opt = opt.optimizer
    return opt


def ensure_adam_state(opt: torch.optim.Optimizer, wrapper=None) -> None:
    """Create AdamW's state for parameters that have none yet (before the first step), equivalent to
    a fresh optimizer: zero moments, step 0 (the matrix rules: their own fresh state). ZeRO-3
    (``wrapper``) puts its flat fp32 partitions into ``opt``'s groups only inside its step: their
    state is created here too, so a checkpoint loads into ZeRO-3 before the first step."""
    if hasattr(opt, "init_state"):
        return opt.init_state()
    flat = getattr(wrapper, "fp32_partitioned_groups_flat", None) or []
    for group in opt.param_groups + [{"params": flat}]:
        for p in group["params"]:
            if not opt.state.get(p):
                opt.state[p] = {"step": scalar_step(0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _owned_matrix(opt, p):
    """The group of ``p`` when its state is partitioned over DP (a matrix rule with an owner), else None."""
    for g in opt.param_groups:
        if g.get("nl_owner") is not None and any(q is p for q in g["params"]):
            return g
    return None


class EngineAccess(ParamAccess):
    """One rank's engine parameters and slow CMS levels (see the module docstring)."""

    def __init__(self, trainer):
        from megatron.core import parallel_state as ps
        self.trainer = trainer
        self.named = trainer.named_parameters()
        self.inner = inner_torch_optimizer(trainer.engine.optimizer)
        ensure_adam_state(self.inner, trainer.engine.optimizer)
        wrapper = trainer.engine.optimizer
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):          # ZeRO 1/2: link moments
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
        self.master = {}                                # bf16 without ZeRO: lp -> fp32 master
        if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
            for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for lo, hi in zip(lows, highs):
                    self.master[id(lo)] = hi
        self.slow = {}
        for lv in trainer.slow.levels.values():
            for p, a in zip(lv["params"], lv["acc"]):
                self.slow[id(p)] = (lv["opt"], a)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        # matrix-rule groups (one matrix each) whose parameter ZeRO replaced by a flat partition: their
        # state is shaped like the whole (tensor shard of the) matrix, kept by one DP rank (optim/rules.py)
        self.matrix = {g["nl_name"]: g for g in self.inner.param_groups if g.get("rule", "adamw") != "adamw"}
        if hasattr(wrapper, "fp32_partitioned_groups_flat"):    # ZeRO-3: groups hold params only in step()
            for sub, gid in wrapper.sub_group_to_group_id.items():
                g, flat = self.inner.param_groups[gid], wrapper.fp32_partitioned_groups_flat[sub]
                if g.get("rule", "adamw") != "adamw":
                    self.inner.bind(g["nl_name"], flat)
                elif hasattr(self.inner, "fresh_state") and not self.inner.state.get(flat):
                    self.inner.state[flat] = self.inner.fresh_state(g, flat)   # NLOptimizer's AdamW groups

    def owners(self):
        return [(n, p) for n, p in self.named
                if not getattr(p, "ds_pipe_replicated", False)
                and (self.tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]

    @staticmethod
    def _partitioned(p) -> bool:
        # ZeRO 1/2 (and bf16) give every engine parameter ``_hp_mapping``, None where this rank holds
        # none of it; the gather is collective either way, so test for the attribute, not its value
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def read(self, name, p):
        if id(p) in self.slow:
            o, acc = self.slow[id(p)]
            owned = _owned_matrix(o, p)
            if owned is not None:                # state on one DP rank: it broadcasts (collective)
                rec = {"value": p.detach().float().clone(), **o.read_matrix(owned), "acc": acc.detach().clone()}
            else:
                rec = read_plain(p, o, acc)
            if self.trainer.dp_size > 1:       # the DP ranks' local sums differ: keep their mean, which
                import torch.distributed as dist   # is what their update step all-reduces to
                dist.all_reduce(rec["acc"], group=self.trainer.dp_group)
                rec["acc"] /= self.trainer.dp_size
            return rec
        if self._partitioned(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
            rec = {"value": safe_get_full_fp32_param(p).detach().float().cpu().clone()}
            if name in self.matrix:                         # collective: the owner broadcasts
                rec.update(self.inner.read_matrix(self.matrix[name]))
                return rec
            for k in MOMENTS:
                rec[k] = safe_get_full_optimizer_state(p, k).detach().float().cpu().clone()
            return rec
        hi = self.master.get(id(p), p)
        rec = read_plain(hi, self.inner)
        return {k: v.cpu() for k, v in rec.items()}

    def write(self, name, p, rec):
        if id(p) in self.slow:
            o, acc = self.slow[id(p)]
            owned = _owned_matrix(o, p)
            if owned is not None:
                with torch.no_grad():
                    p.copy_(rec["value"].to(device=p.device, dtype=p.dtype))
                    acc.copy_(rec["acc"] if "acc" in rec else torch.zeros_like(acc))
                return o.write_matrix(owned, rec)
            return write_plain(p, o, {k: v.to(p.device) for k, v in rec.items()}, acc)
        if self._partitioned(p):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
            dev = self.trainer.device
            safe_set_full_fp32_param(p, rec["value"].to(dev))
            if name in self.matrix:
                self.inner.write_matrix(self.matrix[name], rec)
            else:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, (rec[k] if k in rec else torch.zeros_like(rec["value"])).to(dev), k)
            if hasattr(p, "ds_id"):                      # ZeRO-3: the low-precision partition too
                import deepspeed
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    with torch.no_grad():
                        p.copy_(rec["value"].to(device=p.device, dtype=p.dtype))
            else:
                with torch.no_grad():
                    p.copy_(rec["value"].to(device=p.device, dtype=p.dtype))
            return
        hi = self.master.get(id(p))
        if hi is not None:
            write_plain(hi, self.inner, {k: v.to(hi.device) for k, v in rec.items()})
            with torch.no_grad():
                p.copy_(rec["value"].to(device=p.device, dtype=p.dtype))
        else:
            write_plain(p, self.inner, {k: v.to(p.device) for k, v in rec.items()})

    def local_state(self):
        return {"slow_acc": {n: self.slow[id(p)][1].detach().clone() for n, p in self.named if id(p) in self.slow}}

    def set_local_state(self, state):
        for n, p in self.named:
            if id(p) in self.slow and n in state.get("slow_acc", {}):
                self.slow[id(p)][1].copy_(state["slow_acc"][n])

    def counters(self):
        cfg = self.trainer.cfg
        return {"adam_steps": optimizer_steps(self.inner), "optimizer": cfg.optim.name,
                "level_optimizers": level_optimizers(cfg.optim, cfg.model.cms),
                "slow_updates": {i: optimizer_steps(lv["opt"]) for i, lv in self.trainer.slow.levels.items()}}

    def set_counters(self, c):
        if check_optimizer_switch(c, self.trainer.cfg.optim, self, self.trainer.cfg.model.cms):
            c = {"adam_steps": 0, "slow_updates": {}}
        set_optimizer_steps(self.inner, c["adam_steps"])
        for i, lv in self.trainer.slow.levels.items():
            set_optimizer_steps(lv["opt"], c["slow_updates"].get(i, c["slow_updates"].get(str(i), 0)))
