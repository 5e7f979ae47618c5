"""Inference: recurrent decoding and generation of trained checkpoints (docs/INFERENCE.md).

``from nl_pretrain.infer import Session`` (imported lazily: the CLI's parser loads this package
without torch)."""
_LAZY = {"Session": "nl_pretrain.infer.session", "Generation": "nl_pretrain.infer.session",
         "DecodeState": "nl_pretrain.infer.decode"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
