"""The one dispatcher of the memory operator: which implementation runs, and its entry points.

Implementations (each imports only :mod:`kernels.memory.spec`, never this module):

- ``reference``: :mod:`kernels.memory.naive`, token by token (the semantics).
- ``torch``: :mod:`kernels.memory.chunk_torch` per chunk, :mod:`kernels.memory.sequence_torch` over a
  sequence (the chunk loop in Python; the CPU default).
- ``triton``: whole-sequence kernels with the chunk loop inside (:mod:`kernels.memory.triton_sequence`
  for linear memories with state-free writes, :mod:`kernels.memory.triton_mlp_sequence` for MLP
  memories, :mod:`kernels.memory.triton_projection` for HOPE's projection pass) and the per-chunk
  kernels (:mod:`kernels.memory.triton_impl`) for single chunks.

``resolve_impl`` turns ``memory_impl`` (``auto | torch | triton | reference``) into one of those once
per layer and device; ``auto`` is Triton on CUDA (when triton imports) and PyTorch elsewhere;
``triton`` on CPU tensors needs the interpreter (``TRITON_INTERPRET=1`` set before Python starts).
Every entry point keeps fast-weight state and accumulation in fp32 whatever the input dtype.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from kernels.memory.spec import MemorySpec, State, tensors, to_fp32

IMPLS = ("auto", "torch", "triton", "reference")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        importlib.import_module("kernels.memory.triton_impl")
    except Exception:  # triton missing, or a broken install
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_impls() -> tuple:
    return ("reference", "torch") + (("triton",) if triton_importable() else ())


def resolve_impl(requested: str, device) -> str:
    """``requested`` in ``auto | torch | triton | reference`` -> the implementation to run."""
    device = torch.device(device)
    if requested not in IMPLS:
        raise ValueError(f"memory_impl '{requested}' is not one of {IMPLS}")
    if requested in ("torch", "reference"):
        return requested
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if not triton_importable():
        raise ValueError("memory_impl 'triton' needs the triton package, which does not import here; "
                         "install triton (pip install triton) or use memory_impl 'auto' or 'torch'")
    if device.type != "cuda" and not interpreter_on():
        raise ValueError(f"memory_impl 'triton' cannot run on {device.type} tensors without the Triton "
                         "interpreter; set TRITON_INTERPRET=1 before starting Python, run on a CUDA "
                         "device, or use memory_impl 'auto' or 'torch'")
    return "triton"


def _fp32_torch(fn, *args, **kw):
    """Run a PyTorch form with fp32 state and accumulation: bf16/fp16 inputs or autocast are
    upcast and autocast is switched off inside (the Triton kernels do the same internally)."""
    device = next(tensors(args)).device.type
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors(args))
    if not low and not torch.is_autocast_enabled(device):
        return fn(*args, **kw)
    with torch.autocast(device, enabled=False):
        return fn(*to_fp32(list(args)), **kw)


def memory_chunk(spec: MemorySpec, state: State, mom: Optional[State], k, vhat, eta, alpha, beta, q=None,
                 impl: str = "torch"):
    """One memory over one chunk: ``(reads or None, new_state, new_mom)``.

    Shapes: ``k, q: (N, c, d_in)``, ``vhat: (N, c, d_out)``, ``eta, alpha: (N, c)``, ``beta: (N,)`` or
    None. Every gradient inside the chunk is taken at the chunk-start state (or at ``M_{t-1}`` for
    linear memories with ``grad_at='running'``); reads ``M_{t-1}(q_t)`` come before each write."""
    if spec.momentum != (mom is not None and beta is not None):
        raise ValueError(f"spec.momentum={spec.momentum} but mom/beta given={mom is not None}/{beta is not None}")
    if impl == "triton":
        from kernels.memory import triton_impl
        return triton_impl.memory_chunk(spec, state, mom, k, vhat, eta, alpha, beta, q)
    if impl == "torch":
        from kernels.memory.chunk_torch import memory_chunk as run
    elif impl == "reference":
        from kernels.memory.naive import memory_chunk as run
    else:
        raise ValueError(f"memory impl '{impl}' is not one of ('reference', 'torch', 'triton')")
    return _fp32_torch(run, spec, state, mom, k, vhat, eta, alpha, beta, q)


def memory_sequence(spec: MemorySpec, state: State, mom: Optional[State], k, vhat, eta, alpha, beta, q,
                    chunk: int, self_targets: bool = False, impl: str = "torch", resets=None, recompute: bool = False):
    """One memory over a whole sequence in chunks of ``chunk`` tokens (the last possibly short):
    ``(reads (N, T, d_out) or None, final state, final momentum)``. With ``self_targets`` the
    ``vhat`` argument holds ``v`` and each chunk's target is ``M_ref(l2norm(v))`` (Eq. 84-85).
    ``impl='triton'`` runs one launch forward and one backward for linear memories with state-free
    writes and for MLP memories; other combinations run the per-chunk kernels in a loop.
    ``resets: (N, n_chunks)`` bool or None: chunk j of a row restarts from ``state``/``mom`` where
    true (a packed document starts there). ``recompute`` (PyTorch path): keep only chunk-start states
    for the backward and recompute inside each chunk (the Triton kernels always do)."""
    if spec.momentum != (mom is not None and beta is not None):
        raise ValueError(f"spec.momentum={spec.momentum} but mom/beta given={mom is not None}/{beta is not None}")
    if impl == "triton":
        from kernels.memory.triton_sequence import linear_memory_sequence, sequence_supported
        kw = {} if resets is None else dict(resets=resets)
        if sequence_supported(spec) and not self_targets:
            return linear_memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, **kw)
        mlp = _optional("kernels.memory.triton_mlp_sequence")
        if spec.kind == "mlp" and mlp is not None:
            return mlp.mlp_memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk,
                                           self_targets=self_targets, **kw)
    from kernels.memory import sequence_torch
    if impl == "reference":
        return _fp32_torch(_reference_sequence, spec, state, mom, k, vhat, eta, alpha, beta, q, chunk,
                           self_targets=self_targets, resets=resets)
    if impl == "triton":   # no whole-sequence kernel for this memory: the per-chunk kernels
        return _chunk_loop(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets, impl, resets)
    return _fp32_torch(sequence_torch.memory_sequence, spec, state, mom, k, vhat, eta, alpha, beta, q, chunk,
                       self_targets=self_targets, resets=resets, recompute=recompute)


def projection_sequence(spec: MemorySpec, P, S, u, beta, eta_bias, alpha_bias, eta_max: float, chunk: int,
                        update_eta_scale: float = 1.0, impl: str = "torch", resets=None, recompute: bool = False):
    """HOPE's self-modifying projection pass over a sequence (the stacked k, v, eta, alpha linear
    memories; contract in :func:`kernels.memory.sequence_torch.projection_sequence`):
    ``((k, v, eta, alpha), P_T, S_T)``. ``impl='triton'``: one launch forward, one backward."""
    if impl == "triton":
        proj = _optional("kernels.memory.triton_projection")
        if proj is not None:
            kw = {} if resets is None else dict(resets=resets)
            return proj.projection_sequence(spec, P, S, u, beta, eta_bias, alpha_bias, eta_max, chunk,
                                            update_eta_scale, **kw)
    from kernels.memory import sequence_torch
    return _fp32_torch(sequence_torch.projection_sequence, spec, P, S, u, beta, eta_bias, alpha_bias, eta_max,
                       chunk, update_eta_scale, resets=resets, recompute=recompute)


@functools.lru_cache(maxsize=None)
def _optional(module: str):
    """A whole-sequence kernel module, or None where it does not exist or does not import."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _chunk_loop(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets, impl, resets=None):
    from kernels.memory.sequence_torch import l2norm, restart
    from kernels.memory.spec import memory_read
    outs, T, init = [], k.shape[1], (state, mom)
    for j, s in enumerate(range(0, T, chunk)):
        sl = slice(s, min(s + chunk, T))
        if resets is not None and j > 0:
            state, mom = restart(resets[:, j], init, (state, mom))
        v = vhat[:, sl].float() if impl == "triton" else vhat[:, sl]      # the kernels' state is fp32
        target = memory_read(spec, state, l2norm(v)) if self_targets else v
        o, state, mom = memory_chunk(spec, state, mom, k[:, sl], target, eta[:, sl], alpha[:, sl], beta,
                                     q[:, sl] if q is not None else None, impl=impl)
        outs.append(o)
    return (torch.cat(outs, 1) if q is not None else None), state, mom


def _reference_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets=False, resets=None):
    return _chunk_loop(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets, "reference", resets)
