"""Single-process checkpoints: one file, written to a temporary name and renamed when complete."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(path: str, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)            # atomic: a reader sees the old file or the complete new one


def load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)
