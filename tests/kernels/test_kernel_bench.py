"""bench/kernels.py: runs on CPU (--quick), writes its JSON, and its FLOP count matches the matmuls
the PyTorch chunk form executes (torch's FLOP counter), up to the triangular solve it cannot see."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels.memory import MemorySpec
from kernels.testing import memory_inputs, run_sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "bench", "kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_bench_writes_json(tmp_path):
    bk = _bench_module()
    out = tmp_path / "kernels.json"
    bk.main(["--quick", "--reps", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert "torch" in impls and data["quick"]
    assert {r["case"] for r in data["rows"]} == set(bk.CASES)
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["fwd_bwd_ms"] > 0
        if row["case"] not in bk.PROJECTION:        # the projection pass has no FLOP model
            assert row["tflops"] > 0 and row["train_flops"] > 0


@pytest.mark.slow
def test_bench_triton_rows_under_interpreter(tmp_path):
    """The GPU code path of the bench (triton, triton_seq rows) runs, in the interpreter."""
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "kernels.py"), "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"torch", "triton", "triton_seq"}
    assert not [r for r in rows if "error" in r], rows


@pytest.mark.parametrize("spec", [
    MemorySpec("linear", "gd", "l2", "running", True), MemorySpec("linear", "gd", "l2", "running", False),
    MemorySpec("linear", "dgd", "l2", "chunk_start", True), MemorySpec("mlp", "gd", "l2", "chunk_start", True),
    MemorySpec("mlp", "dgd", "l2", "chunk_start", False),
], ids=lambda s: f"{s.kind}_{s.rule}_{s.grad_at}_mom{int(s.momentum)}")
def test_flop_formula_matches_torch_counter(spec):
    bk = _bench_module()
    N, T, d, C, e = 2, 200, 32, 64, 2          # 200 = 3 chunks of 64 + a short one
    ins = memory_inputs(spec, N=N, T=T, d=d, e=e)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run_sequence(spec, ins, C, "torch")
    ratio = counter.get_total_flops() / bk.memory_flops(spec, N, T, d, e, C)
    assert 0.75 < ratio < 1.05, ratio
