"""The memory model: per-rank parameter counts, the estimate against a measurement, the dry-run verdict."""
from __future__ import annotations

import gc

import torch

from nl_pretrain.cli import main
from nl_pretrain.config import load_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.parallel.memory_model import (LiveBytes, activation_profile, estimate, held_bytes,
                                               parameters_per_rank)
from nl_pretrain.parallel.topology import Layout, step_hidden


def test_parameters_per_rank_match_the_closed_form():
    """Transformer++ tiny under TP2 x PP2 x DP2: embedding rows split by TP (tied: on the first and the
    last stage), per block 4 d^2 / TP attention + 3 d h / TP MLP + two replicated norms, final norm
    on the last stage; ranks ordered tensor fastest, then data, then pipeline."""
    m = load_config(None, ["--model.preset=transformer-tiny"]).model
    d, V, L, tp = m.d_model, m.vocab_size, m.n_layers, 2
    h = step_hidden(d, m.cms[0].expansion)
    block = 4 * d * d // tp + 3 * d * h // tp + 2 * d
    first = V * d // tp + (L // 2) * block
    last = V * d // tp + (L // 2) * block + d
    counts = parameters_per_rank(m, tp=2, pp=2, dp=2)
    assert counts == {0: first, 1: first, 2: first, 3: first, 4: last, 5: last, 6: last, 7: last}


def test_live_bytes_sees_every_storage_once():
    held = torch.zeros(100)                       # 400 bytes held from the start, freed inside
    with LiveBytes().hold([held]) as live:
        del held
        gc.collect()
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)                       # a view: no new storage
        c = torch.ones(250, dtype=torch.float64)
        del a, b
        now = live.current
        del c
    assert live.peak == 4000 + 2000 and now == 2000 and live.current == 0       # a and its view freed


def _measured_peak(overrides):
    cfg = load_config(None, ["--model.memory_impl=torch"] + overrides)
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
    for step in range(2):
        if step == 1:
            assert held_bytes(model, opt) > held_bytes(model)          # the AdamW moments exist now
            live = LiveBytes().hold(model, opt).__enter__()
        model.loss(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    live.__exit__(None, None, None)
    return cfg, live.peak


def test_estimate_within_20_percent_of_the_measured_peak():
    """One process, fp32, PyTorch memory path: HOPE and Gated DeltaNet (the bench covers more)."""
    small = ["--model.d_model=64", "--model.n_heads=2", "--model.vocab_size=512", "--train.micro_batch_size=2"]
    for ov in (["--model.preset=hope-tiny", "--data.seq_len=64"], ["--model.preset=gated_deltanet-tiny",
                                                                     "--data.seq_len=256"]):
        ov = ov + small
        cfg, peak = _measured_peak(ov)
        est = estimate(cfg, Layout(1, 1, 1, 0, cfg.train.micro_batch_size, 1), device="cpu")["total"]
        assert 0.8 < est / peak < 1.2, (ov, est, peak)


def test_zero_partitions_and_micro_batch_scale_exactly():
    cfg = load_config(None, ["--model.preset=hope-tiny", "--data.seq_len=64"])
    base = estimate(cfg, Layout(1, 1, 4, 0, 1, 1), device="cpu")
    for z, part in ((1, "optimizer"), (2, "grads"), (3, "weights")):
        e = estimate(cfg, Layout(1, 1, 4, z, 1, 1), device="cpu")
        assert e[part] == base[part] / 4
        assert e["zero_buffers"] == 5e8 * 4                  # DeepSpeed's default gradient bucket, fp32
    two = estimate(cfg, Layout(1, 1, 4, 0, 2, 1), device="cpu")
    assert two["activations"] == 2 * base["activations"] and two["weights"] == base["weights"]


def test_triton_path_keeps_chunk_start_states():
    """Gated DeltaNet, T = 48 in chunks of 16: the Triton kernel keeps n_chunks + 1 = 4 states of
    (d_h x d_h) fp32 per row (no momentum), nothing of size C x C; the PyTorch path keeps more."""
    m = load_config(None, ["--model.preset=gated_deltanet-tiny"]).model
    dh = m.d_model // m.n_heads
    tri = activation_profile(m, 1, 48, impl="triton")
    assert tri["fast_weight_states"] == 4 * m.n_heads * dh * dh * 4 and tri["intra_chunk"] == 0
    torch_path = activation_profile(m, 1, 48, impl="torch")
    assert sum(torch_path.values()) > sum(tri.values())


def test_dry_run_verdict(capsys):
    args = ["train", "--dry-run", "--world-size", "4", "--model.preset=hope-tiny", "--parallel.tensor=2",
            "--data.seq_len=128"]
    assert main(args + ["--gpu-memory", "80"]) == 0
    assert "verdict: fits: peak" in capsys.readouterr().out
    assert main(args + ["--gpu-memory", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "verdict: does NOT fit: peak" in out and "> 0.01 GiB per GPU" in out

