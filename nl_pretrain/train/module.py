"""Train modules: what one step computes, the seam under :func:`nl_pretrain.train.loop.fit`.

A train module holds the model and its optimizer wherever they live and offers:

- ``rank``, ``world``, ``device``, ``n_params`` (the whole model's), ``global_batch`` (sequences per
  optimizer step over every data-parallel rank), ``plan`` (tensor-parallel split, for checkpoints);
- ``describe()``, ``coords()``, ``layout_dict()``, ``access()`` (checkpoint access,
  :class:`~nl_pretrain.checkpoint.state.ParamAccess`);
- ``data(state)``: this rank's :class:`~nl_pretrain.train.data.DataSource`, continued from a
  checkpoint's data state;
- ``train_step(step, micro_batches) -> loss`` (the global mean), setting ``last_step_finite``
  (agreed over every rank; a non-finite step changes nothing) and ``last_grad_norm``;
- ``eval_sums(micro_batches) -> (summed token loss, labelled tokens)`` over every rank.

:class:`LocalModule` is one process; :class:`~nl_pretrain.parallel.trainer.DistributedTrainer` is one
rank of a TP x PP x DP job.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from nl_pretrain.config import RunConfig
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import ModelOptimizer, lr_at
from nl_pretrain.train.data import DataSource, build_data
from nl_pretrain.train.faults import fault_steps
from nl_pretrain.train.loop import pick_device, seed_everything, set_threads


def grads_finite(model: torch.nn.Module) -> bool:
    """Every gradient of ``model`` is finite (one reduction, one host sync)."""
    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


class LocalModule:
    """The model and :class:`~nl_pretrain.optim.ModelOptimizer` (AdamW + CMS step levels) in one process."""

    rank, world, plan = 0, 1, {}

    def __init__(self, cfg: RunConfig):
        t = cfg.train
        set_threads(t.threads)
        seed_everything(t.seed)
        self.cfg, self.device = cfg, pick_device(t.device)
        self.model = LanguageModel(cfg.model).to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.opt = ModelOptimizer(self.model, cfg.optim, cfg.model.cms)
        self.global_batch = t.micro_batch_size * t.grad_accum
        self.bf16 = t.precision == "bf16"
        self.fault_nan_steps = fault_steps("NL_PRETRAIN_FAULT_NAN_STEPS")
        self.last_step_finite, self.last_grad_norm = True, None

    def describe(self) -> str:
        return "one process"

    def coords(self) -> dict:
        return {"rank": 0, "world": 1, "tp": 0, "tp_size": 1, "pp": 0, "dp": 0, "dp_size": 1}

    def layout_dict(self) -> Optional[dict]:
        return None

    def access(self):
        from nl_pretrain.checkpoint.state import LocalAccess
        return LocalAccess(self.model, self.opt)

    def data(self, state: Optional[dict] = None) -> DataSource:
        t = self.cfg.train
        return build_data(self.cfg.data, t.micro_batch_size, t.seed, state=state)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, step: int, micro_batches: List[dict]) -> float:
        lr = lr_at(step, self.cfg.optim, self.cfg.train.steps)
        total = 0.0
        for j, b in enumerate(micro_batches):
            with self._autocast():
                loss = self.model.loss(*(b[k].to(self.device) for k in ("input_ids", "labels", "doc_ids")))
            if step in self.fault_nan_steps and j == 0:     # fault injection (tests), once per step number
                self.fault_nan_steps.discard(step)
                loss = loss * float("inf")
            (loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        # a finite loss can still have a non-finite gradient (an overflow in backward): such a step is
        # not applied either (clipping by an inf/NaN norm would write NaN into every weight)
        self.last_step_finite = math.isfinite(total) and grads_finite(self.model)
        self.last_grad_norm = self.opt.step(step, lr) if self.last_step_finite else None
        self.opt.zero_grad()                      # a non-finite step: nothing of it reaches the weights
        return total

    @torch.no_grad()
    def eval_sums(self, micro_batches: List[dict]):
        self.model.eval()
        total, count = 0.0, 0
        for b in micro_batches:
            labels = b["labels"].to(self.device)
            with self._autocast():
                logits = self.model(b["input_ids"].to(self.device), b["doc_ids"].to(self.device))
            total += float(torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                             labels.view(-1), ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
        self.model.train()
        return total, count
