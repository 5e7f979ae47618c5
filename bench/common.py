"""Helpers shared by the benchmark scripts: what machine ran them, how loaded it was, the JSON file."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine(threads: int) -> dict:
    """Platform, Python, torch, CPU model and thread counts, for the JSON results."""
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu_count=os.cpu_count(), threads=threads, interop_threads=torch.get_num_interop_threads())
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def load_average():
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(path: str, result: dict) -> None:
    """Write ``result`` to ``path`` (a temporary name, then rename) and say so."""
    from data_pipeline.shards import atomic_write
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(Path(path), json.dumps(result, indent=1).encode())
    print(f"wrote {path}")
