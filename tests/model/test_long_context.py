"""Long context: recomputing inside chunks gives the same gradients, HOPE trains a 16K step, and CMS
periods given in tokens become optimizer steps with the global batch."""
from __future__ import annotations

import pytest
import torch

from nl_pretrain.config import ConfigError, load_config
from nl_pretrain.model import LanguageModel

SMALL = ["--model.preset=hope-tiny", "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1",
         "--model.vocab_size=64", "--model.memory_impl=torch", "--model.max_seq_len=32768"]


def _grads(overrides, T, dtype=torch.float64, seed=0):
    cfg = load_config(None, SMALL + overrides + [f"--data.seq_len={T}"])
    torch.manual_seed(seed)
    model = LanguageModel(cfg.model).to(dtype)
    ids = torch.randint(0, cfg.model.vocab_size, (2, T))
    loss = model.loss(ids, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["hope", "titans", "gated_deltanet"])
def test_recompute_chunks_gives_the_same_gradients(family):
    """float64: every parameter's gradient with model.recompute_chunks equals the plain backward's
    (a 70-token sequence: four full chunks and a short last one)."""
    fam = [f"--model.preset={family}-tiny"]
    loss0, g0 = _grads(fam, 70)
    loss1, g1 = _grads(fam + ["--model.recompute_chunks=true"], 70)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=n)
    assert any(g.abs().max() > 0 for n, g in g0.items() if "mixer" in n)


def test_recompute_chunks_keeps_less():
    """The backward keeps fewer bytes with recompute (chunk-start states, not every intermediate)."""
    from nl_pretrain.parallel.memory_model import LiveBytes
    kept = {}
    for rec in (False, True):
        cfg = load_config(None, SMALL + ["--data.seq_len=256", f"--model.recompute_chunks={rec}"])
        torch.manual_seed(0)
        model = LanguageModel(cfg.model)
        ids = torch.randint(0, 64, (1, 256))
        with LiveBytes() as live:
            loss = model.loss(ids, ids)
            kept[rec] = live.current
        loss.backward()
    assert kept[True] < 0.5 * kept[False], kept


@pytest.mark.slow
def test_hope_trains_a_16k_step():
    """One optimizer step of tiny-width HOPE on a 16,384-token sequence (recompute on): finite loss,
    every parameter gets a finite gradient (chunks of 128 tokens keep the Python chunk loop short)."""
    T = 16384
    cfg = load_config(None, SMALL + [f"--data.seq_len={T}", "--model.recompute_chunks=true", "--model.chunk_mem=128",
                                     "--model.chunk_proj=128",
                                     "--model.cms=[{kind: context, period: 128}, {kind: step, period: 1}]"])
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (1, T))
    loss = model.loss(ids, ids)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.grad.abs().max() > 0)


def test_cms_period_tokens_become_steps():
    from nl_pretrain.config import resolve_token_periods
    cfg = load_config(None, ["--model.preset=hope-tiny", "--data.seq_len=128", "--train.micro_batch_size=2",
                             "--train.grad_accum=2", "--model.cms=[{kind: context, period: 16}, "
                             "{kind: step, period: 1}, {kind: step, period_tokens: 8192}]"])
    resolve_token_periods(cfg, data_parallel=4)            # 2 x 2 x 4 x 128 = 2048 tokens per step
    assert [lvl.period for lvl in cfg.model.cms] == [16, 1, 4]
    cfg = load_config(None, ["--model.preset=hope-tiny", "--data.seq_len=128", "--train.micro_batch_size=2",
                             "--model.cms=[{kind: step, period_tokens: 1000}]"])
    with pytest.raises(ConfigError) as err:
        resolve_token_periods(cfg, data_parallel=1)
    assert str(err.value) == ("model.cms[0].period_tokens (1000) must divide by the tokens per optimizer step "
                              "(256 = micro 2 x accum 1 x data 1 x seq_len 128); use 768 or 1024")
