"""Continuum Memory System (paper Eq. 70-71; docs/MODEL.md D13, D14): a chain of MLP levels.

- :class:`StepLevel`: an ordinary SwiGLU MLP whose parameters change every ``period`` optimizer
  steps with the summed gradient (Eq. 71; the schedule lives in :mod:`nl_pretrain.optim.optimizer`).
- :class:`ContextLevel`: per-sequence fast weights, a per-head MLP memory updated every token
  inside chunks of ``period`` tokens, read before the write, trained online on
  ``1/2 ||MLP(z_t) - z_t W_T||^2`` with the same memory kernel as an SMT MLP memory.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels.memory import MemorySpec, memory_sequence
from nl_pretrain.model.carry import Carry
from nl_pretrain.model.layers import SwiGLU, l2norm
from nl_pretrain.model.memories import MemoryInit, ResolvedImpl, from_rows, to_rows
from nl_pretrain.model.sharding import COLUMN, HEAD_SLICE, HEADS, ROW
from nl_pretrain.model.smt import ALPHA_BIAS_INIT, BETA_LOGIT, ETA_BIAS_INIT


class StepLevel(nn.Module):
    def __init__(self, d: int, level):
        super().__init__()
        self.period, self.lr_scale = level.period, level.lr_scale
        self.mlp = SwiGLU(d, max(1, int(round(level.expansion * d))))

    def forward(self, z: torch.Tensor, docs=None) -> torch.Tensor:
        return self.mlp(z)


class ContextLevel(nn.Module):
    tp_plan = {"w_target": COLUMN, "w_eta": COLUMN, "w_alpha": COLUMN, "w_o": ROW, "beta_logit": HEADS,
               "init": HEADS, "local_heads": HEAD_SLICE}

    def __init__(self, cfg, level):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.cfg, self.period = cfg, level.period
        self.spec = MemorySpec(kind="mlp", rule=cfg.rule, loss="l2", grad_at="chunk_start",
                               momentum=cfg.momentum, residual=False)
        self.init = MemoryInit("mlp", H, d // H, d // H, level.expansion)
        self.w_target = nn.Linear(d, d, bias=False)   # W_T: the level's learned target projection
        self.w_eta = nn.Linear(d, H, bias=True)
        if cfg.retention:                   # without it (Table 6, no weight decay) alpha_t = 1
            self.w_alpha = nn.Linear(d, H, bias=True)
        with torch.no_grad():
            self.w_eta.bias.fill_(ETA_BIAS_INIT)
            if cfg.retention:
                self.w_alpha.bias.fill_(ALPHA_BIAS_INIT)
        self.beta_logit = nn.Parameter(torch.full((H,), BETA_LOGIT))
        self.w_o = nn.Linear(d, d, bias=False)
        self.local_heads = nn.Identity()   # the heads of z this module owns (tensor parallel: a slice)
        self.impl = ResolvedImpl(cfg.memory_impl)

    @property
    def H(self) -> int:
        """Heads this level holds (all of them, or a tensor-parallel rank's share)."""
        return self.beta_logit.shape[0]

    @property
    def doc_alignment(self) -> int:
        return self.period

    def initial_carry(self, batch: int) -> Carry:
        state = self.init.expand(batch)
        return Carry({"mem": state}, {"mem": tuple(torch.zeros_like(w) for w in state) if self.cfg.momentum else None})

    def forward(self, z: torch.Tensor, docs=None, carry: Carry = None):
        """``carry`` (inference): start from this state and return ``(output, final state)``."""
        B, T, _ = z.shape
        impl = self.impl(z.device)
        keys = l2norm(to_rows(self.local_heads(z), self.H))              # unit keys keep the dgd write stable
        targets = to_rows(self.w_target(z), self.H)
        if self.cfg.context_target_norm:   # unit targets: the inner residual stays O(1) (MODEL.md, "Stability")
            targets = l2norm(targets)
        eta = self.cfg.eta_max * self.cfg.mlp_eta_scale * torch.sigmoid(to_rows(self.w_eta(z), self.H)[..., 0])
        if self.cfg.eta_chunk_mean:      # chunk-start gradients: the chunk's mean gradient (docs/MODEL.md)
            eta = eta / self.period
        alpha = (torch.sigmoid(to_rows(self.w_alpha(z), self.H)[..., 0]) if self.cfg.retention
                 else keys.new_ones(keys.shape[:2]))
        beta = torch.sigmoid(self.beta_logit).repeat(B) if self.cfg.momentum else None
        start = self.initial_carry(B) if carry is None else carry
        reads, state, mom = memory_sequence(self.spec, start.states["mem"], start.moms["mem"], keys, targets, eta,
                                            alpha, beta, keys, self.period, impl=impl,
                                            resets=docs.resets(self.period, self.H) if docs is not None else None,
                                            recompute=self.cfg.recompute_chunks)
        y = self.w_o(from_rows(reads, B))
        return y if carry is None else (y, Carry({"mem": state}, {"mem": mom}))


def build_level(cfg, level) -> nn.Module:
    return StepLevel(cfg.d_model, level) if level.kind == "step" else ContextLevel(cfg, level)
