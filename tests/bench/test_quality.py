"""bench/quality.py end to end on a small prepared dataset: runs go through the training loop, land in
the JSON under their suite (with the steps, micro-batch and lr where they differ), run and seed, and
parts merge; bad input is one line."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import quality  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipeline import prepare_dataset
    ds = tmp_path_factory.mktemp("quality") / "ds"
    prepare_dataset("default", str(ds), vocab_size=300, seq_len=32, workers=0, val_fraction=0.3,
                    max_documents=30, progress=False)
    return ds


def test_runs_are_merged_by_suite_run_and_seed(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                  # run directories go under ./runs/quality
    out = tmp_path / "q.json"
    common = ["--data", str(dataset), "--steps", "2", "--micro", "2", "--out", str(out)]
    assert quality.main(["--only", "transformer", "--seeds", "0,1", *common]) == 0
    assert quality.main(["--only", "hope+static_k", "--seeds", "0", "--lr", "6e-3", *common]) == 0
    runs = json.loads(out.read_text())["runs"]
    short = "tiny_2steps_micro2"                                 # not the suite's 300 steps of 8
    assert set(runs) == {short, f"{short}_lr0.006"}
    assert set(runs[short]) == {"transformer"} and set(runs[short]["transformer"]) == {"0", "1"}
    got = runs[f"{short}_lr0.006"]["hope+static_k"]["0"]
    assert got["lr"] == 6e-3 and got["tokens"] == 2 * 2 * 32 and got["nan_steps"] == 0 and got["proj_target_match"]
    assert runs[short]["transformer"]["0"]["proj_target_match"] is False
    assert math.isfinite(got["val_loss"]) and got["val_ppl"] == pytest.approx(math.exp(got["val_loss"]))
    a, b = (runs[short]["transformer"][s]["val_loss"] for s in ("0", "1"))
    assert a != b                                                # seed = initialisation and data order
    assert (tmp_path / f"runs/quality/{short}_lr0.006/hope+static_k-s0").is_dir()
    assert "hope+static_k" in capsys.readouterr().out.splitlines()[-1]


def test_suite_key_separates_other_settings():
    """A cut-down run (the README's --steps 80 --micro 4) must not overwrite the suite's own results."""
    k = quality.suite_key
    assert k("tiny", 3e-3) == k("tiny", 3e-3, 300, 8) == "tiny"
    assert k("small", 3e-3, 150) == "small" and k("small", 3e-3, 300) == "small_300steps"
    assert k("tiny", 3e-3, 80, 4) == "tiny_80steps_micro4"
    assert k("tiny", 6e-3, 300, 8) == "tiny_lr0.006" and k("tiny", 6e-3, 80, 8) == "tiny_80steps_lr0.006"


def test_bad_input_is_one_error_line(dataset, capsys):
    assert quality.main(["--only", "hope,nope", "--data", str(dataset)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --only nope is not a run; choose from {','.join(quality.RUNS)}"]
    assert quality.main(["--data", "/nonexistent/ds"]) == 2
    assert capsys.readouterr().err.startswith("error: --data /nonexistent/ds is not a prepared dataset")
