"""``nl-pretrain plan``: layouts that fit, fastest first, reasons for the rest, one error line for bad input."""
from __future__ import annotations

import re

from nl_pretrain.cli import main
from nl_pretrain.config import load_config
from nl_pretrain.parallel.memory_model import GIB, parameters_per_rank
from nl_pretrain.parallel.plan import Cluster, packing_factor, plan, rank_parameters
from nl_pretrain.parallel.topology import Layout


def test_hope_7b_on_64_gpus(capsys):
    """The README example: every listed layout fits 80 GiB, step times are in order, and rejected
    layouts name their reason (memory, or the launch rule they break)."""
    rc = main(["plan", "--model.preset=hope-7b", "--gpus", "64", "--gpu-memory", "80", "--gpus-per-node", "8",
               "--seq-len", "4096", "--global-batch", "256", "--precision", "bf16", "--show-rejected", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip().endswith("plan: nothing was allocated")
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ TP", line)]
    assert len(rows) == 10
    mem = [float(r.split()[-6]) for r in rows]
    step = [float(r.split()[-5]) for r in rows]
    assert all(m <= 80 for m in mem) and step == sorted(step)
    assert all(int(re.search(r"TP(\d+)", r).group(1)) <= 8 for r in rows)
    rejected = out.split("rejected (")[1].splitlines()[1:-1]
    assert any("GiB per rank > 80 GiB" in r for r in rejected)
    assert any("train.grad_accum" in r and "parallel.pipeline" in r for r in rejected)    # PP needs accum >= PP
    assert any("ZeRO stage 0 or 1 only" in r for r in rejected)


def test_plan_fits_are_sorted_and_checked():
    cfg = load_config(None, ["--model.preset=transformer-tiny"])
    fits, rejected = plan(cfg, Cluster(gpus=4, gpu_memory_gib=0.5), seq_len=256, global_batch=8, device="cpu")
    assert fits and rejected
    assert all(c.memory <= 0.5 * GIB for c in fits)
    assert [c.step_s for c in fits] == sorted(c.step_s for c in fits)
    assert all(c.tp * c.pp * c.dp == 4 and c.dp * c.micro * c.accum == 8 for c in fits + rejected)
    assert all(c.reason for c in rejected)


def test_rank_parameters_is_the_memory_model_count():
    cfg = load_config(None, ["--model.preset=hope-tiny"])
    per_rank = parameters_per_rank(cfg.model, 2, 2, 1)
    assert rank_parameters(cfg, Layout(2, 2, 1, 1, 1, 2)) == {0: per_rank[0], 1: per_rank[2]}


def test_bad_input_is_one_error_line(capsys):
    cases = [(["--gpus", "0", "--global-batch", "8"], "error: --gpus (0) and --gpus-per-node (8) must be >= 1"),
             (["--gpus", "8", "--global-batch", "8", "--gpu-memory", "0"],
              "error: --gpu-memory (0) must be > 0 GiB, e.g. --gpu-memory 80"),
             (["--gpus", "8", "--global-batch", "8", "--seq-len", "100000"],
              "error: --seq-len (100000) must be in [1, model.max_seq_len=256]; raise --model.max_seq_len or "
              "shorten the sequence"),
             (["--gpus", "8", "--global-batch", "0"], "error: --global-batch (0) must be >= 1 sequences"),
             (["--gpus", "8", "--global-batch", "8", "--doc-length", "-1"],
              "error: --doc-length (-1) must be >= 0 tokens (0: documents fill their rows)")]
    for args, line in cases:
        assert main(["plan", "--model.preset=hope-tiny"] + args) == 2
        err = capsys.readouterr().err
        assert err.strip() == line, err


def test_packing_factor_is_the_alignment_bound():
    """Re-laid packed documents grow by less than one chunk alignment each: HOPE-tiny aligns to 16
    tokens (chunks and the context level), Hope-Attention to its context level's 16, Transformer++ to 1."""
    for preset, bound in (("hope-tiny", 1.16), ("hope_attention-tiny", 1.16), ("transformer-tiny", 1.0)):
        m = load_config(None, [f"--model.preset={preset}"]).model
        assert packing_factor(m, 100) == bound and packing_factor(m, 0) == 1.0
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.model.packing import alignment
    import torch
    for preset in ("hope-tiny", "hope_attention-tiny", "titans-tiny"):
        m = load_config(None, [f"--model.preset={preset}"]).model
        with torch.device("meta"):
            blocks = LanguageModel(m).blocks
        assert packing_factor(m, 1) == 1 + (alignment(blocks) if alignment(blocks) > 1 else 0), preset
