"""Launchers: local.sh with 2 CPU ranks trains the tiny preset through `nl-pretrain train`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.preset=hope-tiny", "--data.seq_len=32", "--data.max_documents=20", "--data.val_fraction=0", "--train.micro_batch_size=2",
        "--train.steps=2", "--train.log_every=1", "--train.progress=false", "--optim.warmup_steps=0"]


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu", **extra)
    env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    return env


def test_local_sh_commands():
    out = subprocess.run(["bash", "launch/local.sh", "-n", "2", "--parallel.tensor=2"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env=_env(DRY_RUN="1")).stdout
    assert "torch.distributed.run --standalone --nproc_per_node 2" in out and "nl_pretrain.cli train" in out
    out = subprocess.run(["bash", "launch/local.sh", "-n", "2"], cwd=ROOT, check=True, capture_output=True,
                         text=True, env=_env(DRY_RUN="1", LAUNCHER="deepspeed")).stdout
    assert "deepspeed.launcher.runner --num_gpus 2" in out and "--no_local_rank" in out


def test_local_sh_trains_tiny_hope_on_two_cpu_ranks(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", "launch/local.sh", "-n", "2", *TINY, "--parallel.tensor=2",
                           f"--train.run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(THREADS="1"), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = tensor 2 x pipeline 1 x data 1" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 < summary["final_loss"] < math.log(4096)   # below uniform
    assert (run_dir / "checkpoints" / "final").is_dir()
