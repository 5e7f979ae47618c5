"""Fault injection, as a user meets it (issue 13): each case asserts that nothing was lost and that a
failure is one ``error:`` line with exit status 2, before any work or any file is written.

Most cases call ``nl_pretrain.cli.main`` in this process (a tiny 1-layer model, a few steps); the
ones that SIGKILL a run start it as a subprocess.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nl_pretrain import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.preset=hope-tiny", "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1",
        "--model.vocab_size=300", "--model.max_seq_len=16", "--data.seq_len=16", "--data.max_documents=8",
        "--data.val_fraction=0.2", "--train.micro_batch_size=2", "--train.progress=false",
        "--train.eval_every=1000000", "--train.eval_batches=1", "--train.threads=1", "--train.log_every=1",
        "--checkpoint.keep_last=0", "--optim.warmup_steps=0"]
SHARD, LOCAL, COMMON = "shard-tp000-pp000-dp00000.pt", "local-00000.pt", "common.pt"


def train(capsys, run: Path, *extra) -> tuple:
    """``nl-pretrain train`` in this process: (exit status, stdout, stderr)."""
    rc = cli.main(["train", *TINY, f"--train.run_dir={run}", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def strict_records(path: Path) -> list:
    """metrics.jsonl, refusing bare NaN / Infinity (not JSON)."""
    def bad(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")
    return [json.loads(line, parse_constant=bad) for line in path.read_text().splitlines()]


def train_steps(path: Path) -> list:
    return [r["step"] for r in strict_records(path) if "loss" in r and "nan_event" not in r]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*")) if p.name != ".lock"}


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("done") / "run"
    assert cli.main(["train", *TINY, f"--train.run_dir={run}", "--train.steps=4", "--checkpoint.every=2"]) == 0
    return run


@pytest.fixture
def run4(done_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    return run


# ------------------------------------------------------------------------------ corrupt checkpoints
@pytest.mark.parametrize("name", [SHARD, LOCAL, COMMON, "index.json"])
def test_explicit_resume_of_a_corrupt_checkpoint_is_refused(run4, tmp_path, capsys, name):
    """``--resume DIR`` verifies the sha256 of every file before anything is loaded."""
    flip(ckpt(run4, 4) / name)
    before = snapshot(run4)
    new = tmp_path / "new"
    rc, out, err = train(capsys, new, "--train.steps=6", "--resume", str(ckpt(run4, 4)))
    assert rc == 2
    line = error_line(err)
    assert str(ckpt(run4, 4)) in line and (name in line or "index.json" in line), line
    assert "resume" in line                              # the fix
    assert not new.exists()                              # no empty run directory left behind
    assert snapshot(run4) == before


@pytest.mark.parametrize("name", [SHARD, LOCAL, COMMON, "index.json"])
def test_resume_auto_skips_a_corrupt_checkpoint_of_any_file_kind(run4, capsys, name):
    flip(ckpt(run4, 4) / name)
    rc, out, err = train(capsys, run4, "--train.steps=5", "--resume", "auto")
    assert rc == 0, err
    assert f"resumed from {ckpt(run4, 2)} at step 2" in out
    assert "step-00000004" in err                        # the warning names the skipped one
    assert train_steps(run4 / "metrics.jsonl") == [1, 2, 3, 4, 5]   # replayed steps written once


def test_size_only_verification_is_an_explicit_choice(run4, tmp_path, capsys):
    """checkpoint.verify=size checks sizes only (no sha256): a same-size corruption is not caught there."""
    flip(ckpt(run4, 4) / SHARD)                   # a byte inside a tensor: the file still loads
    rc, out, err = train(capsys, tmp_path / "b", "--train.steps=5", "--resume", str(ckpt(run4, 4)),
                         "--checkpoint.verify=size")
    assert rc == 0 and f"resumed from {ckpt(run4, 4)} at step 4" in out, err
    rc, out, err = train(capsys, tmp_path / "c", "--train.steps=5", "--resume", str(ckpt(run4, 4)))
    assert rc == 2 and "sha256" in error_line(err)          # the default, checkpoint.verify=full


# ------------------------------------------------------------------------------ step numbers
def test_fewer_steps_than_the_checkpoint_is_an_error_before_work(run4, capsys):
    before = snapshot(run4)
    for resume in ("auto", str(ckpt(run4, 4))):
        rc, out, err = train(capsys, run4, "--train.steps=2", "--resume", resume)
        assert rc == 2
        assert "beyond --train.steps=2" in error_line(err) and "--train.steps >= 4" in err
        assert "model hope-tiny" not in out                # no model was built
    assert snapshot(run4) == before


def test_resuming_a_finished_run_leaves_it_untouched(run4, capsys):
    before = snapshot(run4)
    rc, out, err = train(capsys, run4, "--train.steps=4", "--resume", "auto")
    assert rc == 0 and "this run is complete" in out and "step 4" in out, out + err
    assert snapshot(run4) == before
    summary = json.loads((run4 / "summary.json").read_text())
    assert summary["final_loss"] is not None and "val_loss" in summary


def test_metrics_stay_valid_json_with_a_nonfinite_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NL_PRETRAIN_FAULT_NAN_STEPS", "1")
    rc, out, err = train(capsys, tmp_path / "r", "--train.steps=3")
    assert rc == 0, err
    text = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    recs = strict_records(tmp_path / "r" / "metrics.jsonl")
    assert {"step": 2, "nan_event": "skip", "loss": None} in recs
    json.loads((tmp_path / "r" / "summary.json").read_text(), parse_constant=lambda t: 1 / 0)


# ------------------------------------------------------------------------------ kill -9
def _cli_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _cli(run: Path, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "nl_pretrain.cli", "train", *TINY, f"--train.run_dir={run}",
                           *extra], cwd=ROOT, capture_output=True, text=True, env=env or _cli_env(), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["NL_PRETRAIN_FAULT_KILL", "NL_PRETRAIN_FAULT_KILL_SAVE"])
def test_kill_during_a_step_or_a_save_then_resume_loses_nothing(tmp_path, fault):
    """SIGKILL at step 5 (after the step-4 checkpoint), or while saving step 4 (files half written):
    ``--resume auto`` continues from the newest complete checkpoint; metrics hold every step once; the
    final weights equal an uninterrupted run's."""
    import torch
    run, ref = tmp_path / "killed", tmp_path / "straight"
    args = ["--train.steps=6", "--checkpoint.every=2", "--resume", "auto"]
    killed = _cli(run, *args, env=_cli_env(**{fault: "0:5" if fault == "NL_PRETRAIN_FAULT_KILL" else "0:4"}))
    assert killed.returncode == -9, killed.stderr[-2000:]
    back = 4 if fault == "NL_PRETRAIN_FAULT_KILL" else 2
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{back:08d}"
    resumed = _cli(run, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpt(run, back)} at step {back}" in resumed.stdout
    assert train_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert not list((run / "checkpoints").glob("*.tmp-*"))       # the crashed save's directory is gone
    assert _cli(ref, "--train.steps=6").returncode == 0
    got = torch.load(ckpt(run, 6) / SHARD, weights_only=False)["records"]
    want = torch.load(ckpt(ref, 6) / SHARD, weights_only=False)["records"]
    for n, rec in want.items():
        for k, v in rec.items():
            assert torch.equal(got[n][k], v), f"{n}.{k}"


# ------------------------------------------------------------------------------ full disk
def test_full_disk_during_a_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import builtins
    import errno
    from nl_pretrain.checkpoint import store as store_mod

    def full_open(path, mode="r", *a, **kw):
        if "w" in mode and "step-00000004.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return builtins.open(path, mode, *a, **kw)
    monkeypatch.setattr(store_mod, "open", full_open, raising=False)
    run = tmp_path / "r"
    rc, out, err = train(capsys, run, "--train.steps=4", "--checkpoint.every=2")
    assert rc == 2
    line = error_line(err)
    assert "full" in line and "previous checkpoint" in line, line
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    monkeypatch.undo()
    rc, out, err = train(capsys, run, "--train.steps=4", "--checkpoint.every=2", "--resume", "auto")
    assert rc == 0 and f"resumed from {ckpt(run, 2)} at step 2" in out


# ------------------------------------------------------------------------------ failed starts
def _bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [1, 2\n")
    return ["--config", str(p)]


@pytest.mark.parametrize("case", ["yaml", "cuda", "vocab", "resume_dir", "triton", "tensor", "zero", "source"])
def test_a_failed_start_is_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    import torch
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    if case == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the Triton interpreter is on")
    args, want = {
        "yaml": (_bad_yaml(tmp_path), "line 2"),
        "cuda": (["--train.device=cuda"], "--train.device=cpu"),
        "vocab": (["--model.vocab_size=100"], "--model.vocab_size=259"),
        "resume_dir": (["--resume", str(tmp_path / "nope")], "--resume auto"),
        "triton": (["--model.memory_impl=triton"], "memory_impl"),
        "tensor": (["--parallel.tensor=2"], "launch/local.sh -n 2"),
        "zero": (["--parallel.zero_stage=1"], "launch/local.sh -n 2"),
        "source": (["--data.source=/nonexistent/corpus"], "does not exist"),
    }[case]
    run = tmp_path / "run"
    t0 = time.monotonic()
    rc, out, err = train(capsys, run, *args)
    assert rc == 2
    assert want in error_line(err), err
    assert not run.exists()
    if case in ("tensor", "zero"):
        assert time.monotonic() - t0 < 5                     # before DeepSpeed / mpi4py


def test_a_busy_run_directory_fails_at_once(tmp_path, capsys):
    from nl_pretrain.train.rundir import RunDirLock
    run = tmp_path / "run"
    with RunDirLock([run]):
        t0 = time.monotonic()
        rc, out, err = train(capsys, run, "--train.steps=2")
        assert time.monotonic() - t0 < 5
    assert rc == 2 and "is in use by another training run (pid" in error_line(err)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_export_of_a_corrupt_step_directory_is_one_error(run4, tmp_path, capsys):
    flip(ckpt(run4, 4) / SHARD)
    rc = cli.main(["export", "--checkpoint", str(ckpt(run4, 4)), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and SHARD in error_line(err) and "corrupt" in err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_default_threads_are_the_cores_this_process_may_use(monkeypatch):
    import torch
    from nl_pretrain.train.loop import set_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert set_threads(0) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipeline import prepare_dataset
    ds = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset("default", str(ds), vocab_size=300, seq_len=16, workers=0, val_fraction=0.3,
                    max_documents=20, progress=False, shard_samples=200)
    return ds


@pytest.fixture
def ds_copy(dataset, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(dataset, d)
    return d


def _data(ds):
    return [f"--data.dataset={ds}"]


def test_dataset_mismatches_fail_before_work(dataset, tmp_path, capsys):
    for extra, want in ((["--data.seq_len=8"], "--data.seq_len=16"), (["--model.vocab_size=200"],
                                                                       "--model.vocab_size=300")):
        rc, out, err = train(capsys, tmp_path / "run", *_data(dataset), *extra)
        assert rc == 2 and want in error_line(err)
        assert not (tmp_path / "run").exists()
    rc, out, err = train(capsys, tmp_path / "run", f"--data.dataset={tmp_path / 'none'}")
    assert rc == 2 and "prepare-data" in error_line(err) and not (tmp_path / "run").exists()


def test_truncated_shard_fails_at_start_naming_it(ds_copy, tmp_path, capsys):
    shard = ds_copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1000])
    rc, out, err = train(capsys, tmp_path / "run", *_data(ds_copy), "--train.steps=2")
    assert rc == 2 and "train-000000.tar" in error_line(err) and "truncated" in err
    assert not (tmp_path / "run").exists()
    assert cli.main(["verify-data", str(ds_copy)]) == 2
    assert "train-000000.tar" in capsys.readouterr().err


def test_same_size_corrupt_shard_is_found_by_verify_data_and_can_be_skipped(ds_copy, tmp_path, capsys):
    assert cli.main(["verify-data", str(ds_copy)]) == 0
    assert "files ok" in capsys.readouterr().out
    for shard in sorted(ds_copy.glob("train-*.tar")):      # every other sample of every shard
        data = bytearray(shard.read_bytes())
        for pos in range(0, len(data), 2 * 2048):           # a sample: two members of a header + one block
            if data[pos:pos + 5] == b"train":
                data[pos + 150] ^= 0xFF                      # inside its tar header's checksum field
        shard.write_bytes(bytes(data))
    assert cli.main(["verify-data", str(ds_copy)]) == 2
    err = capsys.readouterr().err
    assert "train-000000.tar: fails its sha256 check" in err and error_line(err)
    assert cli.main(["verify-data", "--size-only", str(ds_copy)]) == 0
    capsys.readouterr()
    assert cli.main(["prepare-data", "--out", str(ds_copy), "--verify"]) == 2
    capsys.readouterr()
    rc, out, err = train(capsys, tmp_path / "stop", *_data(ds_copy), "--train.steps=8")
    assert rc == 2 and "--data.skip_corrupt=true" in error_line(err)
    rc, out, err = train(capsys, tmp_path / "skip", *_data(ds_copy), "--train.steps=8", "--data.skip_corrupt=true",
                         "--train.micro_batch_size=4")
    assert rc == 0, err
    assert "warning: skipped unreadable sample" in err
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_samples"] > 0
    assert any(r.get("skipped_samples") for r in strict_records(tmp_path / "skip" / "metrics.jsonl"))
    rc, out, err = train(capsys, tmp_path / "full", *_data(ds_copy), "--train.steps=2", "--data.verify=full")
    assert rc == 2 and "sha256" in error_line(err)


# ------------------------------------------------------------------------------ Ray launcher
def test_ray_launcher_resolves_paths_against_the_callers_directory(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    from ray_train import absolute_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  run_dir: runs/x\n")
    got = absolute_args(["--config", "c.yaml", "--resume", "runs/x/checkpoints/step-00000002",
                         "--data.dataset=data/ds", "--data.source=default"], str(tmp_path))
    assert got[:4] == ["--config", str(cfg), "--resume", str(tmp_path / "runs/x/checkpoints/step-00000002")]
    assert f"--data.dataset={tmp_path / 'data/ds'}" in got and "--data.source=default" in got
    assert got[-1] == f"--train.run_dir={tmp_path / 'runs/x'}"            # from the config file


def test_ray_launcher_fails_fast_on_a_configuration_error(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "launch/ray_train.py", "--num-workers", "2", "--", *TINY,
                           "--parallel.tensor=3", f"--train.run_dir={tmp_path / 'r'}"],
                          cwd=ROOT, capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not a multiple of tensor x pipeline" in error_line(proc.stderr)
    assert time.monotonic() - t0 < 60 and not (tmp_path / "r").exists()


def test_full_disk_during_data_preparation_is_one_error_and_no_dataset(tmp_path, capsys, monkeypatch):
    import errno
    from data_pipeline import shards
    real = shards.atomic_write

    def full(path, data):
        if str(path).endswith(".tar"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)
    monkeypatch.setattr(shards, "atomic_write", full)
    out = tmp_path / "ds"
    rc = cli.main(["prepare-data", "--out", str(out), "--vocab-size", "300", "--seq-len", "16", "--workers", "0",
                   "--max-documents", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "disk holding" in error_line(err)
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    rc, _, err = train(capsys, tmp_path / "run", f"--data.dataset={out}")
    assert rc == 2 and "preparation did not finish" in error_line(err) and not (tmp_path / "run").exists()
