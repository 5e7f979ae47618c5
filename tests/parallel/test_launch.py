"""Launchers: local.sh with 2 CPU ranks trains the tiny preset through `nl-pretrain train`."""
import json
import math
import os
import shutil
import subprocess
import tempfile
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
    assert (run_dir / "checkpoints" / "step-00000002" / "index.json").is_file()


def test_deepspeed_launcher_runs_the_same_training_as_torchrun(tmp_path):
    """LAUNCHER=deepspeed (DeepSpeed's runner, --no_local_rank) on 2 CPU ranks, DP2 ZeRO-1: the
    same losses, bit for bit, as the torchrun path with the same config."""
    losses = {}
    for i, launcher in enumerate(("deepspeed", "torchrun")):
        run_dir = tmp_path / launcher
        env = _env(THREADS="1", LAUNCHER=launcher)
        env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + 1 + i)
        proc = subprocess.run(["bash", "launch/local.sh", "-n", "2", *TINY, "--parallel.zero_stage=1",
                               f"--train.run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=400)
        assert proc.returncode == 0, launcher + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "world 2 = tensor 1 x pipeline 1 x data 2" in proc.stdout, launcher
        losses[launcher] = json.loads((run_dir / "summary.json").read_text())["losses"]
    assert len(losses["deepspeed"]) == 2 and losses["deepspeed"] == losses["torchrun"]


def test_ray_launcher_trains_tiny_hope_with_two_workers(tmp_path):
    run_dir = tmp_path / "run"
    short = tempfile.mkdtemp(prefix="nlr", dir="/tmp")          # AF_UNIX socket paths must stay < 108 bytes
    env = _env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=short)
    proc = subprocess.run([sys.executable, "launch/ray_train.py", "--num-workers", "2", "--num-cpus", "2",
                           "--storage-path", str(tmp_path / "ray_results"), "--", *TINY,
                           "--parallel.zero_stage=1", f"--train.run_dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=500)
    shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and "data 2" in summary["layout"]


def test_slurm_script_generates_one_torchrun_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")   # `show hostnames` stand-in
    (bin_dir / "scontrol").chmod(0o755)
    env = _env(DRY_RUN="1", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_JOB_ID="4242",
               GPUS_PER_NODE="4", PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "launch/slurm.sbatch", "--config", "configs/tiny_hope.yaml", "--parallel.tensor=4"],
                         cwd=ROOT, check=True, capture_output=True, text=True, env=env).stdout
    assert "world 8 on 2 nodes; rendezvous gpu-a17:" in out
    cmd = out.splitlines()[-1]
    for part in ("srun --nodes 2 --ntasks-per-node 1", "torch.distributed.run --nnodes 2 --nproc_per_node 4",
                 "--rdzv_endpoint gpu-a17:", "--rdzv_id 4242", "-m nl_pretrain.cli train --config configs/tiny_hope.yaml "
                 "--parallel.tensor=4"):
        assert part in cmd
    # the generated layout is valid for that world size
    from nl_pretrain.cli import main
    assert main(["train", "--dry-run", "--world-size", "8", "--config", "configs/tiny_hope.yaml",
                 "--parallel.tensor=4"]) == 0
