"""One rank of a TP x PP x DP job as a train module (:mod:`nl_pretrain.train.module`) for the one
training loop, :func:`nl_pretrain.train.loop.fit`.

:class:`DistributedTrainer` builds the single-device model on the meta device from the run seed
(identical on every rank; nothing allocated) and hands it to
:func:`~nl_pretrain.parallel.parallelize.parallelize` (this rank's share materialised in place,
tensor parallel, slow CMS levels out of the engine, activation checkpointing, the DeepSpeed engine,
in that order); it
computes one step (forward, backward, the engine's and the slow levels' updates) and the held-out
sums. Loss normalisation: each DP rank divides its summed token losses by ``global labelled tokens /
DP``, so DeepSpeed's DP-averaged gradients equal those of one process averaging over the whole batch.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from nl_pretrain.config import RunConfig
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import lr_at
from nl_pretrain.parallel.parallelize import parallelize
from nl_pretrain.parallel.tensor import shard_plan
from nl_pretrain.parallel.topology import Layout, init_parallel
from nl_pretrain.train.data import DataSource, build_data
from nl_pretrain.train.faults import fault_steps
from nl_pretrain.train.loop import fit, pick_device


class DistributedTrainer:
    """One rank of a TP x PP x DP job: its shard of the model inside a DeepSpeed engine (a
    ``PipelineEngine`` when ``parallel.pipeline > 1``) plus the slow CMS levels beside it."""

    def __init__(self, cfg: RunConfig, layout: Optional[Layout] = None):
        from megatron.core import parallel_state as ps
        self.cfg = cfg
        self.layout = layout or init_parallel(cfg)
        self.device = pick_device(cfg.train.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        torch.manual_seed(cfg.train.seed)               # the init seed: identical on every rank
        with torch.device("meta"):                      # nothing allocated: parallelize materialises
            model = LanguageModel(cfg.model)            # this rank's share (parallel/materialize.py)
        self.plan = shard_plan(model)                   # how each full tensor is split (checkpoints)
        self.n_params = sum(p.numel() for p in model.parameters())
        par = parallelize(model, cfg, self.layout, self.device)
        self.model, self.engine, self.slow = model, par.engine, par.slow
        self.names, self.engine_named, self.block_ids = par.names, par.engine_named, par.block_ids
        self.optimizer = self.engine.optimizer
        self.global_batch = self.layout.global_batch
        self.bf16 = cfg.train.precision == "bf16"
        self._access = None
        self.last_step_finite, self.last_grad_norm = True, None
        self.fault_nan_steps = fault_steps("NL_PRETRAIN_FAULT_NAN_STEPS")
        if self.layout.pp > 1:
            self._guard_pipeline_step()

    def describe(self) -> str:
        return self.layout.describe()

    def access(self):
        """Per-parameter state access for checkpoints and skipped steps (built on first use)."""
        if self._access is None:
            from nl_pretrain.parallel.access import EngineAccess
            self._access = EngineAccess(self)
        return self._access

    def coords(self) -> dict:
        return {"rank": dist.get_rank(), "world": dist.get_world_size(), "tp": self.tp_rank,
                "tp_size": self.layout.tp, "pp": self.pp_rank, "dp": self.dp_rank, "dp_size": self.dp_size}

    def layout_dict(self) -> dict:
        return {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp, "zero_stage": self.layout.zero_stage}

    def _all_finite(self, local_loss: torch.Tensor) -> bool:
        """Agreed over every rank: was this step's loss finite everywhere?"""
        bad = torch.tensor([0.0 if bool(torch.isfinite(local_loss).all()) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _guarded_step(self, apply_step, local_loss: torch.Tensor) -> None:
        """Run the engine's optimizer step; with ``train.on_nan=skip`` a non-finite step is undone
        (every parameter, moment and counter restored from an in-memory copy taken just before)."""
        finite = self._all_finite(local_loss)
        self.last_step_finite = finite
        # fp32 without ZeRO: the engine's torch AdamW reports no norm; the gradients are final here
        own_norm = self._grad_norm() if self.engine.zero_optimization_stage() == 0 and not self.bf16 else None
        if finite or self.cfg.train.on_nan != "skip":
            apply_step()
            self.last_grad_norm = own_norm if own_norm is not None else _float(self.engine.get_global_grad_norm())
            return
        self.last_grad_norm = None
        from nl_pretrain.checkpoint.state import restore, snapshot
        snap = snapshot(self.access())
        apply_step()
        restore(self.access(), snap)

    def _guard_pipeline_step(self) -> None:
        """The pipeline engine runs forward, backward and the optimizer step inside ``train_batch``:
        route its OptimizerStep instruction through :meth:`_guarded_step` (the last stage knows the loss)."""
        from deepspeed.runtime.pipe import schedule
        engine, table = self.engine, dict(type(self.engine)._INSTRUCTION_MAP)
        original = table[schedule.OptimizerStep]

        def optimizer_step(eng, *args, **kwargs):
            local = eng.total_loss if eng.is_last_stage() and eng.total_loss is not None else torch.zeros(())
            self._guarded_step(lambda: original(eng, *args, **kwargs), local.detach().float().cpu())

        table[schedule.OptimizerStep] = optimizer_step
        engine._INSTRUCTION_MAP = table

    def _grad_norm(self) -> float:
        """2-norm of the engine's gradients over the whole model, before clipping (as one process
        reports it): tensor shards counted on every rank, replicated tensors on tensor rank 0, a tied
        copy on a later pipeline stage not at all; summed over the tensor x pipeline group."""
        from nl_pretrain.parallel.cms_sync import model_parallel_norm
        from megatron.core import parallel_state as ps
        params = [p for _, p in self.engine_named if not getattr(p, "ds_pipe_replicated", False)]
        group = ps.get_model_parallel_group() if self.layout.tp * self.layout.pp > 1 else None
        return float(model_parallel_norm(params, group))

    def named_parameters(self) -> List[tuple]:
        """``(global name, parameter)`` of every parameter this rank holds (engine and slow levels);
        tensor-parallel shards under their full model's name."""
        seen, out = set(), []
        for n, p in self.engine_named + self.slow.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
        return out

    def _global_counts(self, micro_batches: List[dict]) -> List[torch.Tensor]:
        """Labelled tokens of each global micro-batch (all DP ranks' rows), divided by DP: the loss
        normaliser that makes DP-averaged gradients equal one process averaging the whole batch."""
        counts = torch.stack([(b["labels"] != -100).sum().to(torch.float64) for b in micro_batches])
        if self.dp_size > 1:
            dist.all_reduce(counts, group=self.dp_group)
        return [(c / self.dp_size).float() for c in counts]

    def train_step(self, step: int, micro_batches: List[dict]) -> float:
        """One optimizer step over this rank's micro-batches; returns the global mean loss.
        ``self.last_step_finite`` tells (agreed over all ranks) whether the loss was finite; a
        non-finite step under ``train.on_nan=skip`` changes nothing but the data position."""
        lr = lr_at(step, self.cfg.optim, self.cfg.train.steps)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        counts = self._global_counts(micro_batches)
        if step in self.fault_nan_steps:          # fault injection (tests): an empty normaliser -> inf loss
            self.fault_nan_steps.discard(step)    # once: a rolled-back run passes this step again
            counts[0] = torch.zeros_like(counts[0])
        if self.layout.pp > 1:
            items = [((b["input_ids"], b["doc_ids"]), (b["labels"], c)) for b, c in zip(micro_batches, counts)]
            total = self.engine.train_batch(iter(items)).detach().float().cpu()
        else:
            total = torch.zeros(())
            last = len(micro_batches) - 1
            for j, (b, c) in enumerate(zip(micro_batches, counts)):
                ids, labels, docs = (b[k].to(self.device) for k in ("input_ids", "labels", "doc_ids"))
                loss = self.engine(ids, labels, docs, c.to(self.device))
                self.engine.backward(loss)
                total += loss.detach().float().cpu() / len(micro_batches)
                if j == last:
                    self._guarded_step(self.engine.step, total)
                else:
                    self.engine.step()
            if self.dp_size > 1:
                dist.all_reduce(total, group=self.dp_group)
                total /= self.dp_size
        if self.last_step_finite or self.cfg.train.on_nan != "skip":
            self.slow.step(step, lr)
        else:
            self.slow.discard_step()
        return float(total)

    def data(self, state: Optional[dict] = None) -> DataSource:
        return rank_data(self.cfg, self.layout, self.dp_rank, state)

    @torch.no_grad()
    def eval_sums(self, micro_batches: List[dict]):
        """Summed held-out token loss and labelled tokens over every rank (collective). All DP ranks
        evaluate the same number of micro-batches (the fewest any of them has)."""
        n = torch.tensor([len(micro_batches)], dtype=torch.int64)
        if self.dp_size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.dp_group)
        micro_batches = micro_batches[:int(n)]
        sums = torch.tensor([0.0, float(sum(int((b["labels"] != -100).sum()) for b in micro_batches))],
                            dtype=torch.float64)
        if not micro_batches:
            return 0.0, 0
        if self.layout.pp > 1:
            # every micro-batch's loss is divided by (all labelled tokens / (micro-batches x DP)): the
            # engine's average over micro-batches and DP ranks is then the mean over all tokens
            count = sums[1].clone()
            if self.dp_size > 1:
                dist.all_reduce(count, group=self.dp_group)
            c = (count / (len(micro_batches) * self.dp_size)).float().clamp_min(1.0)
            items = [((b["input_ids"], b["doc_ids"]), (b["labels"], c)) for b in micro_batches]
            mean = self.engine.eval_batch(iter(items), num_micro_batches=len(micro_batches))
            self.engine.train()
            return float(mean) * float(count), int(count)
        self.engine.eval()
        one = torch.ones((), device=self.device)
        for b in micro_batches:                  # token_count 1: the summed loss
            ids, labels, docs = (b[k].to(self.device) for k in ("input_ids", "labels", "doc_ids"))
            sums[0] += float(self.engine(ids, labels, docs, one))
        self.engine.train()
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        return float(sums[0]), int(sums[1])


def rank_data(cfg: RunConfig, layout: Layout, dp_rank: int, state: Optional[dict] = None) -> DataSource:
    """This DP rank's data. Built-in corpus: every rank draws the same global micro-batch (``micro x
    DP`` rows) and keeps its rows, training and held-out alike, so the run sees exactly one process's
    batches. ``state``: a checkpoint's (global) data position."""
    if cfg.data.dataset:
        return build_data(cfg.data, layout.micro_batch, cfg.train.seed, dp_rank, layout.dp, state=state)
    m = layout.micro_batch
    src = build_data(cfg.data, m * layout.dp, cfg.train.seed, state=state)

    def rows(batches):
        for b in batches:
            yield {k: v[dp_rank * m:(dp_rank + 1) * m] for k, v in b.items()}
    return DataSource(src.vocab_size, rows(src.train), lambda: rows(src.make_val()), src.description, src.state)


def rank_batches(cfg: RunConfig, layout: Layout, dp_rank: int) -> Iterator[dict]:
    return rank_data(cfg, layout, dp_rank).train


def train_distributed(cfg: RunConfig) -> dict:
    """``nl-pretrain train`` under torchrun / the DeepSpeed launcher / Ray / srun."""
    from nl_pretrain.checkpoint.manager import check_checkpoint_config
    check_checkpoint_config(cfg)
    from nl_pretrain.train.loop import set_threads
    set_threads(cfg.train.threads)
    layout = init_parallel(cfg)
    lock = _lock_run_dir(cfg, dist.get_rank())    # before anything is built
    failed = True
    try:
        out = fit(cfg, DistributedTrainer(cfg, layout))
        failed = False
        return out
    finally:
        if lock is not None:
            lock.release(cleanup=failed)          # a failed start leaves no empty run directory


def _lock_run_dir(cfg: RunConfig, rank: int):
    """Rank 0 holds the run directory for the run; if another run has it, every rank raises."""
    from nl_pretrain.train.rundir import RunDirBusy, RunDirLock, run_dirs
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunDirLock(run_dirs(cfg))
        except (RunDirBusy, OSError) as e:
            error = str(e)
    said = [error]
    dist.broadcast_object_list(said, src=0)
    if said[0] is not None:
        raise RunDirBusy(said[0] if rank == 0 else f"{said[0]} (reported by rank 0)")
    return lock


def _float(x) -> Optional[float]:
    return None if x is None else float(x)
