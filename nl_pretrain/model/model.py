"""The language models: HOPE, Hope-Attention, Transformer++, Titans, Gated DeltaNet.

One block for all of them (pre-norm): ``h = x + mixer(norm(x))`` with the mixer either
self-modifying Titans or causal attention, then the CMS chain ``z <- z + level(norm(z))``.
The families differ only in configuration (presets in :mod:`nl_pretrain.presets`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nl_pretrain.model.attention import Attention
from nl_pretrain.model.cms import build_level
from nl_pretrain.model.init import draw_init_seed, init_parameters
from nl_pretrain.model.layers import RMSNorm
from nl_pretrain.model.packing import run_documents
from nl_pretrain.model.sharding import COLUMN, VOCAB
from nl_pretrain.model.smt import SelfModifyingTitans

ATTENTION_FAMILIES = ("transformer", "hope_attention")


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.family in ATTENTION_FAMILIES:
            self.mixer = Attention(cfg.d_model, cfg.n_heads, cfg.rope_theta)
        else:
            self.mixer = SelfModifyingTitans(cfg)
        self.level_norms = nn.ModuleList(RMSNorm(cfg.d_model, cfg.norm_eps) for _ in cfg.cms)
        self.levels = nn.ModuleList(build_level(cfg, lvl) for lvl in cfg.cms)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        """``docs``: the packed-document layout of ``x`` (:class:`nl_pretrain.model.packing.Documents`)."""
        z = x + self.mixer(self.norm(x), docs)
        for norm, level in zip(self.level_norms, self.levels):
            z = z + level(norm(z), docs)                 # CMS chain (Eq. 70)
        return z


class LanguageModel(nn.Module):
    tp_plan = {"embed": VOCAB, "lm_head": COLUMN}     # blocks and the final norm declare their own

    def __init__(self, cfg, seed: Optional[int] = None):
        """``seed``: the init seed (default: drawn from torch's default generator). Every parameter's
        value is a function of (seed, its name) (:mod:`nl_pretrain.model.init`), so a model built
        under ``torch.device("meta")`` can be materialised piece by piece with the same values."""
        super().__init__()
        self.cfg = cfg
        self.init_seed = draw_init_seed() if seed is None else int(seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every materialised parameter to its initial value (the rules of :mod:`nl_pretrain.model.init`)."""
        init_parameters(self, self.init_seed)

    def hidden(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.norm(run_documents(self.blocks, self.embed(input_ids), doc_ids))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h) if self.lm_head is not None else h @ self.embed.weight.t()

    def forward(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.logits(self.hidden(input_ids, doc_ids))

    def loss(self, input_ids, labels, doc_ids=None) -> torch.Tensor:
        logits = self(input_ids, doc_ids)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()                       # the softmax in fp32 under autocast
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
