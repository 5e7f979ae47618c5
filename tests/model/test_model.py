"""Whole models: attention backend, causality, packed documents, CMS context level."""
import pytest
import torch

from nl_pretrain.config import build_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.model.attention import causal_attention

FAMILIES = ["hope", "hope_attention", "transformer", "titans", "gated_deltanet"]


def tiny(family, **model):
    m = {"preset": f"{family}-tiny", "d_model": 32, "n_heads": 2, "vocab_size": 64, "chunk_mem": 4,
         "chunk_proj": 3}
    m.update(model)
    if family in ("hope", "hope_attention"):
        m.setdefault("cms", [{"kind": "context", "period": 4, "expansion": 1.0},
                             {"kind": "step", "period": 1, "expansion": 2.0}])
    cfg = build_config({"model": m, "data": {"seq_len": 32}})
    torch.manual_seed(0)
    return LanguageModel(cfg.model).double()


def test_sdpa_matches_explicit_softmax_attention():
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(causal_attention(q, k, v), scores.softmax(-1) @ v)


@pytest.mark.gpu
def test_flash_attention_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_causality(family):
    model = tiny(family)
    ids = torch.randint(0, 64, (1, 14))
    with torch.no_grad():
        base = model(ids)
        ids2 = ids.clone()
        ids2[0, 9] = (ids[0, 9] + 1) % 64
        out = model(ids2)
    assert torch.equal(out[:, :9], base[:, :9])
    assert not torch.allclose(out[:, 9:], base[:, 9:])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequence_equals_documents_run_alone(family):
    model = tiny(family)
    docs = [torch.randint(0, 64, (n,)) for n in (5, 9, 1)] + [torch.randint(0, 64, (11,))]
    packed = torch.stack([torch.cat(docs[:3]), torch.cat([docs[3], docs[0][:4]])])
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 1, [0] * 11 + [1] * 4])
    with torch.no_grad():
        out = model(packed, doc_ids)
        alone = [model(d[None])[0] for d in docs]
        tail = model(docs[0][:4][None])[0]
    torch.testing.assert_close(out[0], torch.cat(alone[:3]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], torch.cat([alone[3], tail]), rtol=1e-10, atol=1e-10)


def test_model_batch_isolation():
    model = tiny("hope")
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), torch.cat([model(ids[i:i + 1]) for i in range(3)]),
                                   rtol=1e-12, atol=1e-12)


def test_context_level_reference_equals_chunked():
    torch_model = tiny("hope", memory_impl="torch")
    ref_model = tiny("hope", memory_impl="reference")
    ref_model.load_state_dict(torch_model.state_dict())
    ids = torch.randint(0, 64, (2, 13))
    a, b = torch_model(ids), ref_model(ids)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(a.sum(), list(torch_model.parameters()))
    gb = torch.autograd.grad(b.sum(), list(ref_model.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


def test_loss_ignores_masked_labels():
    model = tiny("transformer")
    ids = torch.randint(0, 64, (2, 8))
    labels = ids.roll(-1, 1)
    masked = labels.clone()
    masked[:, -1] = -100
    full = model.loss(ids, masked)
    manual = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 64), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(full, manual)


def test_bf16_autocast_keeps_memory_state_in_fp32():
    from kernels.memory import MemorySpec, memory_chunk
    spec = MemorySpec(kind="mlp", momentum=True)
    N, c, d = 2, 5, 8
    state = (torch.randn(N, d, 16), torch.randn(N, 16, d))
    mom = tuple(torch.zeros_like(s) for s in state)
    k = torch.nn.functional.normalize(torch.randn(N, c, d), dim=-1).bfloat16()
    args = (k, torch.randn(N, c, d).bfloat16(), torch.rand(N, c) * 0.1, 0.9 + 0.1 * torch.rand(N, c),
            torch.full((N,), 0.9), k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reads, new, new_mom = memory_chunk(spec, state, mom, *args)
    assert reads.dtype == torch.float32 and all(w.dtype == torch.float32 for w in new + new_mom)
    ref = memory_chunk(spec, state, mom, *[a.float() for a in args])
    torch.testing.assert_close(reads, ref[0])


def test_packed_layout_costs_its_tokens():
    """Documents move to chunk-aligned starts inside their own row: a row grows by less than one
    chunk per document (not n_docs rows padded to the longest), and pack(unpack(x)) == x."""
    from nl_pretrain.model.packing import Documents
    lens = [[100, 37, 200], [300, 30, 7]]
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lens])
    docs = Documents(doc_ids, align=16)
    assert docs.length == max(sum(-(-n // 16) * 16 for n in row) for row in lens) == 368   # T = 337
    assert docs.length <= 337 + 3 * 15
    x = torch.randn(2, 337, 3)
    assert torch.equal(docs.pack(docs.unpack(x)), x)
    assert docs.start.sum() == 6 and bool(docs.start[:, ::16].sum() == 6)                 # starts on chunks
    assert docs.resets(4, heads=2).shape == (4, 368 // 4)


@pytest.mark.parametrize("family", ["hope", "hope_attention", "gated_deltanet"])
def test_packed_gradients_equal_documents_run_alone(family):
    model = tiny(family)
    docs = [torch.randint(0, 64, (n,)) for n in (7, 13)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.tensor([[0] * 7 + [1] * 13])
    params = list(model.parameters())
    ga = torch.autograd.grad(model(packed, doc_ids).sin().sum(), params, allow_unused=True)
    gb = torch.autograd.grad(sum(model(d[None]).sin().sum() for d in docs), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), ga, gb):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
