"""bench/quality.py end to end on a small prepared dataset: runs go through the training loop, land in
the JSON under their suite (or ``<suite>_lr<lr>``), run and seed, and parts merge; bad input is one line."""
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
    assert set(runs) == {"tiny", "tiny_lr0.006"}
    assert set(runs["tiny"]) == {"transformer"} and set(runs["tiny"]["transformer"]) == {"0", "1"}
    got = runs["tiny_lr0.006"]["hope+static_k"]["0"]
    assert got["lr"] == 6e-3 and got["tokens"] == 2 * 2 * 32 and got["nan_steps"] == 0 and got["proj_target_match"]
    assert runs["tiny"]["transformer"]["0"]["proj_target_match"] is False
    assert math.isfinite(got["val_loss"]) and got["val_ppl"] == pytest.approx(math.exp(got["val_loss"]))
    a, b = (runs["tiny"]["transformer"][s]["val_loss"] for s in ("0", "1"))
    assert a != b                                                # seed = initialisation and data order
    assert (tmp_path / "runs/quality/tiny_lr0.006/hope+static_k-s0").is_dir()
    assert "hope+static_k" in capsys.readouterr().out.splitlines()[-1]


def test_bad_input_is_one_error_line(dataset, capsys):
    assert quality.main(["--only", "hope,nope", "--data", str(dataset)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --only nope is not a run; choose from {','.join(quality.RUNS)}"]
    assert quality.main(["--data", "/nonexistent/ds"]) == 2
    assert capsys.readouterr().err.startswith("error: --data /nonexistent/ds is not a prepared dataset")
