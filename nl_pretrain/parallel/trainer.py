"""The distributed trainer: megatron-core tensor parallel + the DeepSpeed runtime.

Order of construction (fixed): process groups and layout check -> the full model from the run seed
(identical on every rank) -> tensor parallel (keep this rank's shard) -> CMS step levels of period
> 1 taken out of the DeepSpeed optimizer (:mod:`nl_pretrain.parallel.cms_sync`) -> activation
checkpointing per block -> ``deepspeed.initialize`` with a client AdamW, ZeRO over the DP group
(``mpu``), bf16, gradient accumulation. Reuses the single-process loop's helpers
(:mod:`nl_pretrain.train.loop`).

Loss normalisation: each DP rank divides its summed token losses by ``global labelled tokens / DP``,
so DeepSpeed's DP-averaged gradients equal those of one process averaging over the whole batch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from nl_pretrain.config import RunConfig, dump_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import lr_at
from nl_pretrain.optim.optimizer import _param_groups
from nl_pretrain.parallel.cms_sync import StepLevelSync
from nl_pretrain.parallel.random import seed_model_parallel
from nl_pretrain.parallel.tensor import apply_tensor_parallel, parallel_loss, shard_plan
from nl_pretrain.parallel.topology import DeepSpeedMPU, Layout, init_parallel, stage_layers
from nl_pretrain.train.data import build_data
from nl_pretrain.train.faults import fault_steps, handle_nan, maybe_kill
from nl_pretrain.train.loop import MetricsLog, pick_device


def deepspeed_config(cfg: RunConfig, layout: Layout) -> dict:
    zero = {"stage": layout.zero_stage}
    if layout.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _checkpoint_blocks(blocks) -> None:
    """Activation checkpointing per block: recompute each block's forward in the backward."""
    import deepspeed

    for block in blocks:
        inner = block.forward
        block.forward = (lambda f: lambda x: deepspeed.checkpointing.checkpoint(f, x))(inner)


def _zero3_external_parameters(wrapper) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; parameters read by a parent's
    forward (memory initial states, the tied output embedding) must be registered with that parent."""
    from deepspeed.runtime.zero import register_external_parameter
    from nl_pretrain.model.cms import ContextLevel
    from nl_pretrain.model.smt import SelfModifyingTitans
    from nl_pretrain.model.memories import MemoryInit
    model = wrapper.model
    for mod in model.modules():
        if isinstance(mod, (SelfModifyingTitans, ContextLevel)):
            for child in mod.modules():
                if isinstance(child, MemoryInit):
                    for p in child.parameters():
                        register_external_parameter(mod, p)
    if model.lm_head is None:
        register_external_parameter(wrapper, model.embed.weight)


def _every_step_groups(model, named, cfg) -> list:
    """Parameter groups as in ModelOptimizer: decay / no decay, and a group per period-1 step level
    with its own ``lr_scale``."""
    from nl_pretrain.model.cms import StepLevel
    scale = {}
    for name, mod in model.named_modules():
        if isinstance(mod, StepLevel) and mod.lr_scale != 1.0:
            for p in mod.parameters():
                scale[id(p)] = mod.lr_scale
    groups = _param_groups([(n, p) for n, p in named if id(p) not in scale], cfg.optim.weight_decay)
    for s in sorted(set(scale.values())):
        groups += _param_groups([(n, p) for n, p in named if scale.get(id(p)) == s], cfg.optim.weight_decay, s)
    return groups


class LossModule(torch.nn.Module):
    """What the DeepSpeed engine runs: the language model and its (vocab-parallel) loss."""

    def __init__(self, model: LanguageModel, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, input_ids, labels, doc_ids, token_count):
        # bf16 engine: weights are bf16; autocast lines up the dtypes at every matmul while the
        # memory kernels keep their state in fp32 (as in the single-process bf16 path)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return parallel_loss(self.model, input_ids, labels, doc_ids, token_count)


class DistributedTrainer:
    """One rank of a TP x PP x DP job: its shard of the model inside a DeepSpeed engine (a
    ``PipelineEngine`` when ``parallel.pipeline > 1``) plus the slow CMS levels beside it."""

    def __init__(self, cfg: RunConfig, layout: Optional[Layout] = None):
        import deepspeed
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.layout = layout or init_parallel(cfg)
        self.device = pick_device(cfg.train.device)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        torch.manual_seed(cfg.train.seed)               # the full model: identical on every rank
        model = LanguageModel(cfg.model)
        self.plan = shard_plan(model)                   # how each full tensor is split (checkpoints)
        apply_tensor_parallel(model)
        seed_model_parallel(cfg.train.seed)
        model.to(self.device)
        self.model = model
        # global parameter names (this rank's tensor-parallel shard of each), whatever wraps them later
        self.names = {id(p): n.replace(".inner.", ".") for n, p in model.named_parameters()}
        stages = [list(stage_layers(cfg.model.n_layers, self.layout.pp, s)) for s in range(self.layout.pp)]
        self.block_ids = stages[self.pp_rank]
        local_blocks = [(i, model.blocks[i]) for i in self.block_ids]
        norm_group = ps.get_model_parallel_group() if self.layout.tp * self.layout.pp > 1 else None
        self.slow = StepLevelSync(local_blocks, cfg.optim, cfg.model.cms, self.dp_group, norm_group)
        if cfg.parallel.activation_checkpointing:
            _checkpoint_blocks([b for _, b in local_blocks])
        if self.layout.pp > 1:
            from nl_pretrain.parallel.pipeline import build_pipeline
            module = build_pipeline(model, self.layout, stages, bf16=cfg.train.precision == "bf16")
            mpu = None                                   # the pipeline engine builds its grid (same order)
        else:
            module = LossModule(model, bf16=cfg.train.precision == "bf16")
            mpu = DeepSpeedMPU()
            if self.layout.zero_stage == 3:
                _zero3_external_parameters(module)
        named = [(self.names[id(p)], p) for p in module.parameters()]
        self.engine_named = named
        opt = torch.optim.AdamW(_every_step_groups(model, named, cfg), lr=cfg.optim.lr,
                                betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=opt, config=deepspeed_config(cfg, self.layout), mpu=mpu,
            model_parameters=[p for _, p in named])
        self.bf16 = cfg.train.precision == "bf16"
        self._access = None
        self.last_step_finite = True
        self.fault_nan_steps = fault_steps("NL_PRETRAIN_FAULT_NAN_STEPS")
        if self.layout.pp > 1:
            self._guard_pipeline_step()

    def access(self):
        """Per-parameter state access for checkpoints and skipped steps (built on first use)."""
        if self._access is None:
            from nl_pretrain.checkpoint.state import EngineAccess
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
        if finite or self.cfg.train.on_nan != "skip":
            apply_step()
            return
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


def rank_data(cfg: RunConfig, layout: Layout, dp_rank: int, state: Optional[dict] = None):
    """``(micro-batch iterator, state function)`` of this DP rank. Built-in corpus: every rank draws
    the same global micro-batch (``micro x DP`` rows) and keeps its rows, so the run sees exactly one
    process's batches. ``state``: a checkpoint's (global) data position."""
    if cfg.data.dataset:
        src = build_data(cfg, layout.micro_batch, cfg.train.seed, dp_rank, layout.dp, state=state)
        return src.train, src.state
    m = layout.micro_batch
    src = build_data(cfg, m * layout.dp, cfg.train.seed, state=state)

    def rows():
        for b in src.train:
            yield {k: v[dp_rank * m:(dp_rank + 1) * m] for k, v in b.items()}
    return rows(), src.state


def rank_batches(cfg: RunConfig, layout: Layout, dp_rank: int) -> Iterator[dict]:
    return rank_data(cfg, layout, dp_rank)[0]


def train_distributed(cfg: RunConfig) -> dict:
    """``nl-pretrain train`` under torchrun / the DeepSpeed launcher / Ray / srun."""
    from nl_pretrain.checkpoint.manager import check_checkpoint_config
    check_checkpoint_config(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    trainer = DistributedTrainer(cfg)
    lock = _lock_run_dir(cfg, dist.get_rank())
    try:
        return _train_distributed(cfg, trainer)
    finally:
        if lock is not None:
            lock.release()


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


def _train_distributed(cfg: RunConfig, trainer: "DistributedTrainer") -> dict:
    from nl_pretrain.checkpoint.manager import Checkpointer
    from nl_pretrain.train.rundir import write_text_atomic
    layout, rank = trainer.layout, dist.get_rank()
    run_dir = Path(cfg.train.run_dir)
    ckpt = Checkpointer(cfg, trainer.access(), trainer.coords(), trainer.plan, trainer.layout_dict())
    tokens_per_step = layout.global_batch * cfg.data.seq_len
    step, data_state = 0, None
    if cfg.train.resume:
        path = ckpt.find(cfg.train.resume)
        if path is None:
            if rank == 0:
                print(f"resume: no complete checkpoint under {ckpt.root}; starting at step 0", flush=True)
        else:
            common = ckpt.load(path)
            step, data_state = common["step"], common["data"]
            if rank == 0:
                note = "" if common["same_layout"] else f" (saved under {common['layout']}, now {trainer.layout_dict()})"
                print(f"resumed from {path} at step {step}{note}", flush=True)
    data, data_state_fn = rank_data(cfg, layout, trainer.dp_rank, data_state)
    log = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        log = MetricsLog(run_dir)
        print(f"distributed: {layout.describe()}", flush=True)
    start = window = time.perf_counter()
    losses, window_steps, nan_streak, events = [], 0, 0, []
    while step < cfg.train.steps:
        maybe_kill(step, rank, run_dir)
        loss = trainer.train_step(step, [next(data) for _ in range(layout.grad_accum)])
        if not trainer.last_step_finite:
            nan_streak += 1
            event = handle_nan(cfg, step, loss, nan_streak, rank)
            if event == "rollback":
                ckpt.wait()
                path = ckpt.find("auto")
                if path is None:
                    raise FloatingPointError(f"loss is {loss} at step {step} and there is no checkpoint under "
                                             f"{ckpt.root} to roll back to")
                back = ckpt.load(path)["step"]
                events.append({"step": step, "event": "rollback", "to_step": back})
                if log:
                    log.write(step + 1, {"nan_event": "rollback", "loss": loss, "rolled_back_to": back})
                step = back                     # the data position stays: the batches since are skipped
                continue
            events.append({"step": step, "event": "skip"})
            if log:
                log.write(step + 1, {"nan_event": "skip", "loss": loss})
            step += 1
            continue
        nan_streak = 0
        losses.append(loss)
        window_steps += 1
        step += 1
        if rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            now = time.perf_counter()
            n = max(1, min(window_steps, len(losses)))
            tps = window_steps * tokens_per_step / max(now - window, 1e-9)
            rec = {"loss": sum(losses[-n:]) / n, "tokens_per_s": tps, "tokens": step * tokens_per_step,
                   "elapsed_s": now - start}
            log.write(step, rec)
            print(f"step {step}/{cfg.train.steps} loss {rec['loss']:.4f} tok/s {tps:,.0f}", flush=True)
            window, window_steps = now, 0
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
            ckpt.save(step, step * tokens_per_step, data_state_fn())
    summary = {"final_loss": losses[-1] if losses else float("nan"), "steps": cfg.train.steps,
               "layout": layout.describe(), "elapsed_s": time.perf_counter() - start, "nan_events": events,
               "losses": losses}
    if cfg.checkpoint.save_final:
        ckpt.save(cfg.train.steps, cfg.train.steps * tokens_per_step, data_state_fn())
        ckpt.wait()
        summary["checkpoint"] = str(ckpt.store.latest())
    ckpt.wait()
    if rank == 0:
        log.close()
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
