"""Data pipeline: sources -> byte-level BPE -> packed WebDataset shards (Ray) -> resumable loader.

See docs/DATA.md. The names below are imported lazily, so that a Ray worker that only needs
``data_pipeline.prepare`` does not pay for importing torch, and the CLI stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TokenLoader": "data_pipeline.loader",
    "load_tokenizer": "data_pipeline.tokenizer",
    "prepare_dataset": "data_pipeline.prepare",
    "load_manifest": "data_pipeline.manifest",
    "verify_dataset": "data_pipeline.manifest",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
