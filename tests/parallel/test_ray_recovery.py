"""Recovery under the Ray launcher: a worker SIGKILLed during a step or while writing a checkpoint
makes Ray Train restart the worker group, which resumes from the newest complete checkpoint; the
final weights and moments equal an uninterrupted run's.

One real local Ray cluster (2 CPUs, 2 workers over gloo); the uninterrupted reference runs the same
config in 2 plain gloo processes (tests/parallel/harness.py), which is bitwise equal to a Ray run.
~90 s in all on 2 shared cores.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from harness import run_distributed
from nl_pretrain.config import load_config, to_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))   # resume_workers
from resume_workers import train_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 6, 2
FAULTS = {   # env var: (value, the marker's first words, the checkpoint the restarted group resumes from)
    "NL_PRETRAIN_FAULT_KILL": ("1:3", "rank 1 killed at step 3", 2),            # after the step-2 save
    "NL_PRETRAIN_FAULT_KILL_SAVE": ("1:4", "rank 1 killed while saving step 4", 2),  # step 4 half written
}
# test_launch.py's tiny preset, 6 steps; one intra-op thread in both runs, as the reduction order of
# a multi-threaded kernel could differ between the two launch paths
ARGS = ["--model.preset=hope-tiny", "--data.seq_len=32", "--data.max_documents=20", "--data.val_fraction=0",
        "--train.micro_batch_size=2", f"--train.steps={STEPS}", "--train.log_every=1", "--train.progress=false",
        "--optim.warmup_steps=0", f"--checkpoint.every={EVERY}", "--parallel.zero_stage=1", "--train.threads=1"]


def _final_records(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    return {dp: torch.load(ckpt / f"shard-tp000-pp000-dp{dp:05d}.pt", weights_only=False)["records"]
            for dp in (0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_killed_worker_is_restarted_and_resumes_to_the_uninterrupted_weights(tmp_path, fault):
    value, said_marker, back = FAULTS[fault]
    run_dir = tmp_path / "killed"
    short = tempfile.mkdtemp(prefix="nlr", dir="/tmp")          # AF_UNIX socket paths must stay < 108 bytes
    env = dict(os.environ, DS_ACCELERATOR="cpu", RAY_AUTH_MODE="disabled", RAY_TMPDIR=short, **{fault: value})
    try:
        proc = subprocess.run([sys.executable, "launch/ray_train.py", "--num-workers", "2", "--num-cpus", "2",
                               "--max-failures", "1", "--storage-path", str(tmp_path / "ray_results"), "--",
                               *ARGS, f"--train.run_dir={run_dir}"],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=500)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    marker = run_dir / (".fault-kill-done" if fault == "NL_PRETRAIN_FAULT_KILL" else "checkpoints/.fault-kill-save-done")
    assert marker.read_text().startswith(said_marker)
    said = proc.stdout + proc.stderr
    assert "starting at step 0" in said                            # the first worker group
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{back:08d}'} at step {back}" in said, said[-3000:]

    ref_dir = tmp_path / "uninterrupted"
    tree = to_dict(load_config(None, [*ARGS, f"--train.run_dir={ref_dir}"]))
    ref = run_distributed(train_runs, 2, [tree], timeout=600)[0][0]

    # the restarted run's summary holds the steps it ran itself, bitwise those of the straight run
    assert json.loads((run_dir / "summary.json").read_text())["losses"] == ref["losses"][back:]
    got, want = _final_records(run_dir), _final_records(ref_dir)
    for dp in (0, 1):
        assert got[dp] and got[dp].keys() == want[dp].keys()
        for name, rec in want[dp].items():
            assert rec.keys() == got[dp][name].keys(), name
            for key, value in rec.items():                         # value, exp_avg, exp_avg_sq
                assert torch.equal(got[dp][name][key], value), f"dp{dp} {name}.{key} differs"

