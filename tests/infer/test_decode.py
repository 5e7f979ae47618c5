"""Recurrent decoding == the training-time function (float64), every family; state sizes."""
import pytest
import torch

from nl_pretrain.config import build_config
from nl_pretrain.infer import Session
from nl_pretrain.infer.tokenizer import load_tokenizer_path
from nl_pretrain.model import LanguageModel

CASES = [("hope", {}), ("hope", {"proj_memory": "mlp", "momentum": False}),
         ("hope", {"rule": "dgd", "linear_grad": "chunk_start", "inner_loss": "dot"}), ("hope_attention", {}),
         ("transformer", {}), ("titans", {}), ("gated_deltanet", {})]


def session(family, **model):
    """A small float64 model of the family: chunk_mem 4, chunk_proj 3 (SMT alignment 12), CMS period 4."""
    m = {"preset": f"{family}-tiny", "d_model": 32, "n_heads": 2, "vocab_size": 300, "chunk_mem": 4,
         "chunk_proj": 3, "n_layers": 2}
    m.update(model)
    if family in ("hope", "hope_attention"):
        m.setdefault("cms", [{"kind": "context", "period": 4, "expansion": 1.0},
                             {"kind": "step", "period": 1, "expansion": 2.0}])
    cfg = build_config({"model": m, "data": {"seq_len": min(32, m.get("max_seq_len", 32))}})
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).double().eval()
    return Session(model, cfg, load_tokenizer_path("bytes"))


@pytest.mark.parametrize("family,extra", CASES, ids=[f"{f}-{'-'.join(e) or 'preset'}" for f, e in CASES])
def test_prefill_then_steps_equal_the_full_forward(family, extra):
    s = session(family, **extra)
    T = 40
    ids = torch.randint(0, 259, (3, T))
    # row 0: a document starts at 29 (while decoding); row 1: at 7 (inside its prompt); row 2: one document
    doc_ids = torch.zeros(3, T, dtype=torch.long)
    doc_ids[0, 29:] = 1
    doc_ids[1, 7:] = 1
    with torch.no_grad():
        full = s.model(ids, doc_ids)                       # the packed training path
    lengths = torch.tensor([5, 14, 1])                     # prompts of different lengths (right-padded)
    prompt_docs = torch.where(torch.arange(T) < lengths[:, None], doc_ids, doc_ids[:, :1])
    logits, state = s.prefill(ids, lengths, prompt_docs)
    rows = torch.arange(3)
    worst = max(float((logits[b, :lengths[b]] - full[b, :lengths[b]]).abs().max()) for b in range(3))
    pos = lengths.clone()
    while int(pos.max()) < T:
        p = pos.clamp(max=T - 1)
        new_doc = doc_ids[rows, p] != doc_ids[rows, (p - 1).clamp(min=0)]
        out, state = s.step(ids[rows, p], state, new_doc)
        live = pos < T
        worst = max(worst, float((out[live] - full[rows[live], p[live]]).abs().max()))
        pos = pos + 1
    assert worst < 1e-12, worst                          # 12 tokens per SMT alignment: 3 chunks, both memories


@pytest.mark.parametrize("family", ["hope", "titans", "gated_deltanet", "transformer"])
def test_state_size_constant_for_recurrent_families(family):
    s = session(family)
    ids = torch.randint(0, 259, (2, 60))
    _, short = s.prefill(ids[:, :8])
    _, long = s.prefill(ids)
    for t in range(5):
        _, long = s.step(ids[:, t], long)
    if family == "transformer":                         # the KV cache: 2 layers x (k, v) x tokens x d x 8 bytes
        assert long.nbytes_per_sequence() == 2 * 2 * 65 * 32 * 8
        assert short.nbytes_per_sequence() == 2 * 2 * 8 * 32 * 8
    else:
        assert long.nbytes_per_sequence() == short.nbytes_per_sequence() > 0


def test_attention_prompt_longer_than_max_seq_len_is_refused():
    s = session("transformer", max_seq_len=16)
    with pytest.raises(ValueError, match=r"a prompt of 21 tokens \+ 4 new tokens needs 25 positions but transformer "
                                         r"attends over at most model.max_seq_len=16; shorten the prompt"):
        s.generate(["x" * 20], max_new_tokens=4)
    session("hope", max_seq_len=16).generate(["x" * 20], max_new_tokens=4)   # recurrent: no such limit


def test_generate_greedy_follows_the_full_forward_argmax():
    s = session("hope")
    prompts = ["def f(x):", "import os\n"]
    gen = s.generate(prompts, max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    allowed = s.allowed(300)
    for p, out in zip(prompts, gen.tokens):
        ids = s.encode_prompt(p)
        for tok in out:
            with torch.no_grad():
                nxt = s.model(torch.tensor([ids]))[0, -1].masked_fill(~allowed, float("-inf")).argmax()
            assert int(nxt) == tok
            ids.append(tok)
    assert gen.state_bytes > 0 and gen.new_tokens == 24


def test_sampling_settings():
    s = session("gated_deltanet")
    a = s.generate(["abc"], max_new_tokens=6, temperature=1.0, seed=3)
    b = s.generate(["abc"], max_new_tokens=6, temperature=1.0, seed=3)
    assert a.tokens == b.tokens                          # seeded
    greedy = s.generate(["abc"], max_new_tokens=6, temperature=0.0).tokens
    assert s.generate(["abc"], max_new_tokens=6, top_k=1, seed=5).tokens == greedy
    assert s.generate(["abc"], max_new_tokens=6, top_p=1e-6, seed=5).tokens == greedy
    with pytest.raises(ValueError, match=r"--top-p 1.5 must be in \(0, 1\]"):
        s.generate(["abc"], max_new_tokens=6, top_p=1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["hope", "titans", "gated_deltanet", "hope_attention"])
def test_decoding_on_the_triton_path_matches_the_full_forward(family):
    """float32 on CUDA with the whole-sequence Triton kernels (their final states are the carry)."""
    s = session(family, memory_impl="triton")
    s.model.float().cuda()
    s.device = torch.device("cuda")
    T = 40
    ids = torch.randint(0, 259, (2, T), device="cuda")
    with torch.no_grad():
        full = s.model(ids)
    lengths = torch.tensor([5, 13])
    logits, state = s.prefill(ids, lengths)
    rows, pos, worst = torch.arange(2, device="cuda"), lengths.cuda(), 0.0
    while int(pos.max()) < T:
        p = pos.clamp(max=T - 1)
        out, state = s.step(ids[rows, p], state)
        live = pos < T
        worst = max(worst, float((out[live] - full[rows[live], p[live]]).abs().max()))
        pos = pos + 1
    assert worst < 1e-4, worst
