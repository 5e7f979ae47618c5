"""Initial parameter values as a function of (init seed, parameter name) (docs/MODEL.md D22).

Every parameter of :class:`~nl_pretrain.model.LanguageModel` draws from its own generator, seeded
from the model's init seed and the parameter's name in the single-device model. A tensor's value
therefore does not depend on which other tensors were built before it, so a rank of a parallel job
can build the model on the meta device and materialise only what it holds (its tensor-parallel
slices, its pipeline stage) with exactly the values the one-process build gives
(:mod:`nl_pretrain.parallel.materialize`).

The rules below are the model's initialisation (they replace whatever the constructors drew):
embeddings and linear weights ``N(0, init_std)``, output projections (``w_o``, ``w_down``)
``N(0, init_std / sqrt(2 n_layers))``; causal convolutions start near identity (newest tap 1, plus
``0.02 N(0, 1)``); learned memory initial states as :class:`~nl_pretrain.model.memories.MemoryInit`
defines them; norms, gate biases and momentum logits are the constructors' constants. A parameter
without a rule is an error (add one here).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn

from nl_pretrain.model.cms import ContextLevel
from nl_pretrain.model.layers import CausalConv, RMSNorm
from nl_pretrain.model.memories import MemoryInit
from nl_pretrain.model.smt import ALPHA_BIAS_INIT, BETA_LOGIT, ETA_BIAS_INIT, SelfModifyingTitans

OUTPUT_PROJECTIONS = ("w_o", "w_down")
# constant parameters: (owner class, attribute) -> value
CONSTANTS = {
    (RMSNorm, "weight"): 1.0,
    (SelfModifyingTitans, "eta_bias"): ETA_BIAS_INIT,
    (SelfModifyingTitans, "alpha_bias"): ALPHA_BIAS_INIT,
    (SelfModifyingTitans, "beta_logit"): BETA_LOGIT,
    (SelfModifyingTitans, "out_norm"): 1.0,
    (ContextLevel, "beta_logit"): BETA_LOGIT,
}
BIASES = {(ContextLevel, "w_eta"): ETA_BIAS_INIT, (ContextLevel, "w_alpha"): ALPHA_BIAS_INIT}


def draw_init_seed() -> int:
    """An init seed from torch's default CPU generator (so ``torch.manual_seed(s)`` fixes the model)."""
    return int(torch.randint(0, 2 ** 62, (), device="cpu"))


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _module(model: nn.Module, parts) -> nn.Module:
    mod = model
    for p in parts:
        mod = mod[int(p)] if p.isdigit() else getattr(mod, p)
    return mod


def is_random(model: nn.Module, name: str) -> bool:
    """Whether ``name``'s initial value is drawn (False: a constant the constructor also sets)."""
    parts = name.split(".")
    owner, leaf = _module(model, parts[:-1]), parts[-1]
    if isinstance(owner, nn.Linear) and leaf == "bias":
        return False
    return (type(owner), leaf) not in CONSTANTS


def initial_value(model: nn.Module, name: str, seed: int, shape: Optional[torch.Size] = None) -> torch.Tensor:
    """The full single-device value (fp32, CPU) of parameter ``name`` of ``model`` (which may live
    on the meta device: only the module structure and shapes are read)."""
    parts = name.split(".")
    owner, leaf = _module(model, parts[:-1]), parts[-1]
    shape = tuple(shape if shape is not None else getattr(owner, leaf).shape)
    gen = torch.Generator().manual_seed(parameter_seed(seed, name))
    normal = lambda std: torch.randn(shape, generator=gen).mul_(std)  # noqa: E731  (in place: one full copy)
    cfg = model.cfg
    if isinstance(owner, nn.ParameterList):                          # MemoryInit.weights.<i>
        mem = _module(model, parts[:-2])
        return _memory_init(mem, int(leaf), shape, normal)
    if isinstance(owner, nn.Embedding):
        return normal(cfg.init_std)
    if isinstance(owner, nn.Linear):
        parent = _module(model, parts[:-2]) if len(parts) > 2 else model
        if leaf == "bias":
            key = (type(parent), parts[-2])
            if key not in BIASES:
                raise TypeError(f"no initial value for the bias '{name}': add a rule to nl_pretrain/model/init.py")
            return torch.full(shape, BIASES[key])
        if name == "lm_head.weight" or parts[-2] not in OUTPUT_PROJECTIONS:
            return normal(cfg.init_std)
        return normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    if isinstance(owner, CausalConv):                                # near identity: the newest tap carries x
        w = torch.zeros(shape)
        w[:, 0, -1] = 1.0
        return w + normal(0.02)
    if (type(owner), leaf) in CONSTANTS:
        return torch.full(shape, CONSTANTS[(type(owner), leaf)])
    raise TypeError(f"no initial value for '{name}' ({type(owner).__name__}.{leaf}): add a rule to "
                    f"nl_pretrain/model/init.py")


def _memory_init(mem: MemoryInit, index: int, shape, normal) -> torch.Tensor:
    if mem.kind == "linear":                                         # (H, d_out, d_in)
        w = normal(mem.std)
        if mem.identity and shape[1] == shape[2]:
            w = w + torch.eye(shape[2])
        return w
    if index == 0:                                                   # w1: (H, d_out, hidden)
        return normal(mem.std)
    return normal(1.0 / math.sqrt(shape[2]))                         # w2: (H, hidden, d_in)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Give every materialised parameter of ``model`` its initial value (meta ones are skipped)."""
    for name, p in model.named_parameters():
        if not p.is_meta:
            p.copy_(initial_value(model, name, seed, p.shape))
