"""One training run per run directory: a second one fails before any work, naming the holder; a
holder that dies (even by SIGKILL) frees the directory at once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nl_pretrain.config import build_config
from nl_pretrain.train.loop import train
from nl_pretrain.train.rundir import RunDirBusy, RunDirLock, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]


def _cfg(run_dir: Path, **checkpoint):
    return build_config({"model": {"preset": "hope-tiny", "d_model": 32, "n_heads": 2, "n_layers": 1,
                                   "vocab_size": 260, "max_seq_len": 16},
                         "data": {"seq_len": 16, "max_documents": 8, "val_fraction": 0.0},
                         "train": {"steps": 2, "micro_batch_size": 2, "progress": False, "run_dir": str(run_dir),
                                   "eval_every": 10 ** 6},
                         "checkpoint": {"keep_last": 0, **checkpoint}})


def test_second_run_in_a_held_run_dir_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("NL_PRETRAIN_LOCK_WAIT_S", "0.5")
    run = tmp_path / "run"
    with RunDirLock([run]):
        with pytest.raises(RunDirBusy, match=rf"{run} is in use by another training run \(pid {os.getpid()} on "):
            train(_cfg(run))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]          # no config, metrics or checkpoint
    summary = train(_cfg(run))                                          # free again: trains
    assert summary["steps"] == 2 and (run / "checkpoints" / "latest").is_file()


def test_a_checkpoint_dir_outside_the_run_dir_is_held_too(tmp_path, monkeypatch):
    monkeypatch.setenv("NL_PRETRAIN_LOCK_WAIT_S", "0.5")
    shared_ckpt = tmp_path / "ckpt"
    with RunDirLock([shared_ckpt]):
        with pytest.raises(RunDirBusy, match=str(shared_ckpt)):
            train(_cfg(tmp_path / "other-run", dir=str(shared_ckpt)))


def test_a_killed_holder_frees_the_run_dir(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from nl_pretrain.train.rundir import RunDirLock; "
                               f"lock = RunDirLock([{str(run)!r}]); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"pid {holder.pid} on "):
            RunDirLock([run], wait_s=0.2)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        t0 = time.monotonic()
        RunDirLock([run], wait_s=10).release()                         # no stale lock to clean up
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
