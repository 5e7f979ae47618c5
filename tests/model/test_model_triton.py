"""The model with ``memory_impl=triton`` == ``torch`` for every family: loss and every parameter
gradient (under the Triton interpreter on CPU, in a subprocess; directly on a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

from kernels.testing import rel_err, run_interpreter_cases
from nl_pretrain.config import CMSLevel, ModelConfig
from nl_pretrain.model.model import LanguageModel
from nl_pretrain.presets import preset_model_dict

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FAMILIES = ["hope", "titans", "gated_deltanet", "hope_attention"]
SWITCHED = ["hope+static_k+adaptive_q+no_retention"]   # the per-chunk projection pass (Table 6 switches, D21)
TOL = 2e-5        # fp32 kernels vs fp32 PyTorch forms (observed ~3e-7 .. 2e-6)


def build(family, impl, chunk=5):
    base, _, switches = family.partition("+")
    d = preset_model_dict(f"{base}-tiny" + (f"+{switches}" if switches else ""))
    d.pop("preset")
    d.update(d_model=32, n_heads=2, n_layers=1, vocab_size=64, memory_impl=impl, chunk_mem=chunk, chunk_proj=chunk)
    d["cms"] = [CMSLevel(**(dict(c, period=chunk) if c["kind"] == "context" else c)) for c in d["cms"]]
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**d))


def check_family(family, device="cpu", T=12, packed=False):
    ref, fast = build(family, "torch").to(device), build(family, "triton").to(device)
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, T), device=device)           # T = 12, chunk 5: the last chunk is short
    doc_ids = None
    if packed:                                                  # row 0: documents of 7 and T-7 tokens
        doc_ids = torch.zeros(2, T, dtype=torch.long, device=device)
        doc_ids[0, 7:] = 1
    la, lb = ref.loss(ids, ids.roll(-1, 1), doc_ids), fast.loss(ids, ids.roll(-1, 1), doc_ids)
    assert abs(la.item() - lb.item()) < 1e-5 * abs(la.item())
    ga = torch.autograd.grad(la, list(ref.parameters()), allow_unused=True)
    gb = torch.autograd.grad(lb, list(fast.parameters()), allow_unused=True)
    for (name, _), x, y in zip(ref.named_parameters(), ga, gb):
        assert (x is None) == (y is None), name
        if x is not None:
            assert rel_err(y, x) < TOL, (name, rel_err(y, x))


@pytest.mark.skipif(not INTERP, reason="interpreter case: runs in the subprocess of test_triton_model_equals_torch")
@pytest.mark.parametrize("family", FAMILIES)
def test_interp_family(family):
    check_family(family)


@pytest.mark.skipif(not INTERP, reason="interpreter case: runs in the subprocess of test_triton_model_equals_torch")
@pytest.mark.parametrize("family", SWITCHED)
def test_interp_switched_family(family):
    check_family(family)


@pytest.mark.skipif(not INTERP, reason="interpreter case: runs in the subprocess of test_triton_model_equals_torch")
@pytest.mark.parametrize("family", ["hope", "gated_deltanet"])
def test_interp_packed_family(family):
    check_family(family, packed=True)


@pytest.mark.slow
def test_triton_model_equals_torch():
    run_interpreter_cases(__file__, len(FAMILIES) + len(SWITCHED) + 2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES + SWITCHED)
def test_gpu_family(family):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_family(family, device="cuda", T=200)
