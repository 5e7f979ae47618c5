"""One consolidated model from any checkpoint: ``model.safetensors`` + ``config.yaml``.

``nl-pretrain export --checkpoint <dir> --out <dir>``: ``<dir>`` is a ``step-XXXXXXXX`` checkpoint or
a checkpoint root (its newest complete checkpoint). Tensor-parallel pieces are concatenated and the
records of every pipeline stage and data-parallel rank united, so the file holds each parameter of
the single-device :class:`~nl_pretrain.model.LanguageModel` once (fp32), whatever layout wrote it.
:func:`load_exported` builds the model on one CPU from the two files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nl_pretrain.checkpoint.state import FORMAT, Assembler
from nl_pretrain.checkpoint.store import CheckpointStore


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "index.json").is_file():
        return p
    if p.is_dir():
        found = CheckpointStore(p, verify_on_latest="full").latest()
        if found is not None:
            return found
    raise FileNotFoundError(f"--checkpoint {path}: neither a complete checkpoint (step-XXXXXXXX with index.json) "
                            f"nor a checkpoint root holding one; point it at <run_dir>/checkpoints")


def consolidate(checkpoint: str):
    """``(path, common, cfg, tensors)``: every parameter of the single-device model, whatever layout
    wrote the checkpoint (also what :mod:`nl_pretrain.infer` loads a checkpoint with)."""
    import yaml
    from nl_pretrain.config import build_config
    from nl_pretrain.model import LanguageModel

    path = resolve_checkpoint(checkpoint)
    store = CheckpointStore(path.parent)
    common = store.read(path, "common.pt")
    if common.get("format") != FORMAT:
        raise ValueError(f"{path}: format {common.get('format')!r}, this version reads {FORMAT!r}")
    index = store.index(path)
    shards = [store.read(path, n) for n in sorted(index["files"]) if n.startswith("shard-")]
    asm = Assembler(shards)
    cfg = build_config(yaml.safe_load(common["config"]))
    with torch.device("meta"):
        expected = dict(LanguageModel(cfg.model).named_parameters())
    missing = sorted(set(expected) - set(asm.names()))
    if missing:
        raise ValueError(f"{path} lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}: "
                         f"incomplete checkpoint")
    tensors = {}
    for name, meta_p in expected.items():
        t = asm.full(name)["value"].contiguous()
        if tuple(t.shape) != tuple(meta_p.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} in {path}, the model config says {tuple(meta_p.shape)}")
        tensors[name] = t
    return path, common, cfg, tensors


def export_checkpoint(checkpoint: str, out: str) -> dict:
    """Write ``out/model.safetensors``, ``out/config.yaml`` and the run's ``out/tokenizer.json``
    (temp names, then rename; checkpoints written before tokenizers were carried have none)."""
    from safetensors.torch import save_file
    path, common, cfg, tensors = consolidate(checkpoint)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(common["step"]), "tokens": str(common["tokens"]), "source": str(path),
            "layout": json.dumps(common["layout"]), "format": "nl-pretrain-export/1"}
    tmp = out_dir / "model.safetensors.part"
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())             # safetensors creates the file owner-only (0600)
    os.replace(tmp, out_dir / "model.safetensors")
    tmp = out_dir / "config.yaml.part"
    tmp.write_text(common["config"])
    os.replace(tmp, out_dir / "config.yaml")
    tok = common.get("tokenizer")
    if tok is not None:
        tmp = out_dir / "tokenizer.json.part"
        tmp.write_text(tok["json"])
        os.replace(tmp, out_dir / "tokenizer.json")
    n = sum(t.numel() for t in tensors.values())
    return {"checkpoint": str(path), "step": common["step"], "parameters": n, "tensors": len(tensors),
            "out": str(out_dir), "tokenizer": tok is not None}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_exported(directory: str):
    """The exported model on CPU, in eval mode, and its config."""
    from safetensors.torch import load_file
    from nl_pretrain.config import load_config
    from nl_pretrain.model import LanguageModel
    d = Path(directory)
    cfg = load_config(str(d / "config.yaml"), [])
    model = LanguageModel(cfg.model)
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return model.eval(), cfg
