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
