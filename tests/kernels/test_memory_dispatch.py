"""``resolve_impl``: the concrete memory implementation for a device, with clear errors."""
from __future__ import annotations

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


def test_triton_listed_when_importable():
    assert ("triton" in available_impls()) == dispatch.triton_importable()


def test_rel_err():
    b = torch.tensor([3.0, 4.0])
    assert rel_err(b, b) == 0.0
    assert abs(rel_err(b + torch.tensor([0.0, 0.5]), b) - 0.1) < 1e-12
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_err(torch.ones(2), torch.zeros(2)) > 1e20
    with pytest.raises(ValueError, match="shapes differ"):
        rel_err(torch.zeros(2), torch.zeros(3))
