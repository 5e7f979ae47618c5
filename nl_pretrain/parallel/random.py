"""Random state for tensor / pipeline parallel ranks, on CPU and GPU (no CUDA-only RNG tracker).

megatron-core's ``model_parallel_cuda_manual_seed`` needs CUDA; this is the same contract without it:
- the default generators (CPU and, if present, CUDA) get ``seed + 100 * pp_rank``: identical on the
  tensor-parallel ranks of a stage, so dropout on replicated activations agrees across them;
- :func:`tensor_parallel_rng` switches to a second stream seeded ``seed + 2718 + tp_rank``: use it for
  randomness inside a tensor-parallel region (dropout on sharded heads), which must differ per shard.
Initialisation does not depend on either: every parameter draws from its own generator seeded from
the init seed and its name (:mod:`nl_pretrain.model.init`), so the shard a rank materialises
(:mod:`nl_pretrain.parallel.materialize`) equals the single-process slice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

TP_SEED_OFFSET, PP_SEED_STRIDE = 2718, 100
_tp_states: Optional[dict] = None


def _devices():
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def seed_model_parallel(seed: int, tp_rank: Optional[int] = None, pp_rank: Optional[int] = None) -> None:
    global _tp_states
    if tp_rank is None or pp_rank is None:
        from megatron.core import parallel_state as ps
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + PP_SEED_STRIDE * pp_rank)
    with torch.random.fork_rng(devices=_devices()):
        torch.manual_seed(seed + TP_SEED_OFFSET + tp_rank)
        _tp_states = _capture()


def _capture() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


@contextmanager
def tensor_parallel_rng():
    """Draw from this tensor-parallel rank's own stream; the default stream is left untouched."""
    global _tp_states
    if _tp_states is None:
        raise RuntimeError("call seed_model_parallel(seed) before tensor_parallel_rng()")
    with torch.random.fork_rng(devices=_devices()):
        torch.set_rng_state(_tp_states["cpu"])
        if "cuda" in _tp_states:
            torch.cuda.set_rng_state(_tp_states["cuda"])
        yield
        _tp_states = _capture()


def get_rng_state() -> Optional[dict]:
    """This rank's tensor-parallel stream (``None`` before :func:`seed_model_parallel`), for checkpoints."""
    return _tp_states


def set_rng_state(state: Optional[dict]) -> None:
    """Continue the tensor-parallel stream from :func:`get_rng_state`'s value."""
    global _tp_states
    _tp_states = state
