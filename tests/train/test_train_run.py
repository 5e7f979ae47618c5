"""End-to-end: the CLI trains a tiny model and leaves a complete run directory."""
import json
import subprocess
import sys

import pytest
import torch


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "nl_pretrain.cli", *args], capture_output=True, text=True,
                          check=check)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/tiny_hope.yaml", "configs/tiny_transformer.yaml"])
def test_train_writes_run_directory_and_learns(tmp_path, config):
    run = tmp_path / "run"
    res = run_cli("train", "--config", config, f"--train.run_dir={run}", "--train.steps=24",
                  "--train.log_every=4", "--train.eval_every=12", "--train.eval_batches=2",
                  "--train.micro_batch_size=4", "--data.seq_len=64", "--data.max_documents=60",
                  "--data.val_fraction=0.2", "--model.vocab_size=259", "--train.progress=false",
                  "--optim.warmup_steps=4", "--data.dataset=")
    assert "held-out loss" in res.stdout
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, train      # it learns
    assert [r["step"] for r in evals] == [12, 24]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    final = run / "checkpoints" / "step-00000024"
    assert (run / "checkpoints" / "latest").read_text().strip() == final.name
    common = torch.load(final / "common.pt", weights_only=False)
    assert common["step"] == 24 and common["counters"]["adam_steps"] == 24
    shard = torch.load(final / "shard-tp000-pp000-dp00000.pt", weights_only=False)
    assert "embed.weight" in shard["records"] and "exp_avg" in shard["records"]["embed.weight"]
    assert (final / "local-00000.pt").is_file() and (final / "index.json").is_file()
    assert not list((run / "checkpoints").glob("*.tmp-*"))


def test_train_bad_override_fails_before_work(tmp_path):
    res = run_cli("train", "--config", "configs/tiny_hope.yaml", f"--train.run_dir={tmp_path / 'r'}",
                  "--optim.lr=-1", check=False)
    assert res.returncode == 2 and "optim.lr=-1.0 must be > 0" in res.stderr
    assert not (tmp_path / "r").exists()


def test_missing_dataset_names_the_fix(tmp_path):
    res = run_cli("train", "--config", "configs/tiny_hope.yaml", f"--train.run_dir={tmp_path / 'r'}",
                  f"--data.dataset={tmp_path / 'nope'}", check=False)
    assert res.returncode == 2 and "prepare-data" in res.stderr


@pytest.mark.slow
def test_train_on_prepared_dataset(tmp_path):
    from data_pipeline import prepare_dataset
    ds = tmp_path / "ds"
    prepare_dataset("default", str(ds), vocab_size=512, seq_len=64, workers=0, val_fraction=0.2,
                    max_documents=40, progress=False)
    run = tmp_path / "run"
    res = run_cli("train", "--config", "configs/tiny_hope.yaml", f"--train.run_dir={run}", "--train.steps=12",
                  "--train.log_every=6", "--train.eval_every=12", "--train.eval_batches=2",
                  "--train.micro_batch_size=4", "--data.seq_len=64", f"--data.dataset={ds}",
                  "--train.progress=false", "--optim.warmup_steps=2")
    assert "held-out loss" in res.stdout
    common = torch.load(run / "checkpoints" / "step-00000012" / "common.pt", weights_only=False)
    assert common["data"]["samples_consumed"] == 12 * 4          # the loader's global position is saved
    bad = run_cli("train", "--config", "configs/tiny_hope.yaml", f"--train.run_dir={run}2", f"--data.dataset={ds}",
                  "--data.seq_len=128", check=False)
    assert bad.returncode == 2 and "differs from the dataset's seq_len (64)" in bad.stderr
