"""Fast-weight memory updates: one spec, one dispatcher, several implementations.

Layout (one operator, as flash-linear-attention lays one out):

- ``spec``: :class:`MemorySpec`, reads, and the composition shared by every implementation (leaf).
- ``naive``: token by token, readable, the semantic contract (docs/MODEL.md).
- ``chunk_torch`` / ``sequence_torch``: chunk-parallel PyTorch forms (the CPU default).
- ``triton_affine`` / ``triton_impl``: per-chunk Triton kernels; ``triton_sequence``,
  ``triton_mlp_sequence``, ``triton_projection``: whole-sequence kernels (the chunk loop inside).
- ``dispatch``: resolves ``memory_impl`` and routes every call.
"""
from kernels.memory.dispatch import (  # noqa: F401
    available_impls,
    memory_chunk,
    memory_sequence,
    projection_sequence,
    resolve_impl,
)
from kernels.memory.spec import MemorySpec, memory_read  # noqa: F401
