"""Choose the concrete memory implementation for a device (``memory_impl`` in the model config).

``auto`` is Triton on CUDA (when triton is importable) and the chunk-parallel PyTorch form
elsewhere; ``torch`` and ``reference`` run anywhere; ``triton`` runs on CUDA tensors, or on CPU
tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before Python starts).
"""
from __future__ import annotations

import os

import torch

IMPLS = ("auto", "torch", "triton", "reference")


def triton_importable() -> bool:
    try:
        from kernels.memory import triton_impl  # noqa: F401
    except Exception:  # triton missing, or a broken install
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(requested: str, device: torch.device) -> str:
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


def memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk: int, impl: str = "torch"):
    """A memory over a whole sequence in chunks of ``chunk`` tokens, for plain (state-independent)
    targets ``vhat``: the model's chunk loop of :func:`kernels.memory.memory_chunk`, or, with
    ``impl='triton'`` on a memory the whole-sequence kernel supports (linear, running or dot
    gradient), one fused launch (:mod:`kernels.memory.triton_sequence`). Same returns as
    ``memory_chunk``, with reads for all T tokens (None when ``q`` is None)."""
    if impl == "triton":
        from kernels.memory.triton_sequence import linear_memory_sequence, sequence_supported
        if sequence_supported(spec):
            return linear_memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk)
    from kernels.memory import memory_chunk
    outs, T = [], k.shape[1]
    for s in range(0, T, chunk):
        sl = slice(s, min(s + chunk, T))
        o, state, mom = memory_chunk(spec, state, mom, k[:, sl], vhat[:, sl], eta[:, sl], alpha[:, sl], beta,
                                     q[:, sl] if q is not None else None, impl=impl)
        outs.append(o)
    return (torch.cat(outs, 1) if q is not None else None), state, mom
