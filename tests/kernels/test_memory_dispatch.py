"""``resolve_impl``: the concrete memory implementation for a device, with clear errors."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.memory import available_impls
from kernels.memory import dispatch
from kernels.memory.dispatch import resolve_impl
from kernels.testing import rel_err

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_explicit_impls_pass_through(impl):
    assert resolve_impl(impl, CPU) == impl
    assert resolve_impl(impl, CUDA) == impl


def test_auto_is_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    assert resolve_impl("auto", CPU) == "torch"
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    assert resolve_impl("auto", CUDA) == "triton"
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    assert resolve_impl("auto", CUDA) == "torch"


def test_unknown_impl_names_the_value():
    with pytest.raises(ValueError, match="'cuda_graph' is not one of"):
        resolve_impl("cuda_graph", CPU)


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as err:
        resolve_impl("triton", CPU)
    assert "memory_impl 'triton'" in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", CPU) == "triton"
    assert resolve_impl("triton", CUDA) == "triton"


def test_triton_missing_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    with pytest.raises(ValueError, match="install triton"):
        resolve_impl("triton", CUDA)


_BLOCK_TRITON = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by the test")
sys.meta_path.insert(0, Block())
from kernels.memory.dispatch import available_impls, resolve_impl
assert "triton" not in available_impls(), available_impls()
try:
    resolve_impl("triton", "cpu")
except ValueError as e:
    print(e)
else:
    raise SystemExit("resolve_impl('triton') did not refuse without triton")
"""


def test_triton_missing_from_a_process_that_cannot_import_it():
    """A fresh process where ``import triton`` fails: not listed, and asking for it names the fix."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _BLOCK_TRITON], cwd=root, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "install triton (pip install triton)" in proc.stdout


def test_triton_listed_where_it_is_installed():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here")
    assert "triton" in available_impls()


def test_rel_err():
    b = torch.tensor([3.0, 4.0])
    assert rel_err(b, b) == 0.0
    assert abs(rel_err(b + torch.tensor([0.0, 0.5]), b) - 0.1) < 1e-12
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_err(torch.ones(2), torch.zeros(2)) > 1e20
    with pytest.raises(ValueError, match="shapes differ"):
        rel_err(torch.zeros(2), torch.zeros(3))
