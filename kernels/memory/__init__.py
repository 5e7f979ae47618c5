"""Fast-weight memory updates: one functional interface, several implementations.

- ``naive``: token by token, readable, the semantic contract (DESIGN.md §4.2).
- ``chunk_torch``: chunk-parallel matmul form in PyTorch (default on CPU).
- Triton kernels plug in behind :func:`kernels.memory.interface.memory_chunk`.
"""
from kernels.memory.interface import (  # noqa: F401
    MemorySpec,
    memory_chunk,
    memory_read,
    available_impls,
)
