"""Launchers: local.sh with 2 CPU ranks trains the tiny preset through `nl-pretrain train`."""
import json
import math
import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

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


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_trains_tiny_hope_on_a_started_cluster(tmp_path):
    """As a cluster user would: `ray start --head`, then the README's `ray job submit --working-dir .`
    with a relative --config (resolved in the job's working directory, the uploaded copy, which leaves
    out what .gitignore names: data/, runs/; hence the built-in corpus and an absolute run_dir); the
    one test here with a real Ray cluster (the recovery test has the other)."""
    import importlib.util
    import signal
    if importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("ray.dashboard") is None:
        pytest.skip("`ray job submit` needs ray[default] (pip install -e '.[ray]')")
    run_dir = tmp_path / "run"
    short = tempfile.mkdtemp(prefix="nlr", dir="/tmp")          # AF_UNIX socket paths must stay < 108 bytes
    env = _env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=short, RAY_USAGE_STATS_ENABLED="0")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                             f"--temp-dir={short}", "--disable-usage-stats"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)                 # its own group: stopped below, alone
    try:
        proc = None
        for _ in range(60):                                  # the jobs API comes up after the head
            proc = subprocess.run([ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}",
                                   "--working-dir", ".", "--", sys.executable, "launch/ray_train.py",
                                   "--address", "auto", "--num-workers", "2", "--", "--config",
                                   "configs/tiny_hope.yaml", *TINY, "--data.dataset=", "--parallel.zero_stage=1",
                                   f"--train.run_dir={run_dir}"],
                                  cwd=ROOT, capture_output=True, text=True, env=env, timeout=500)
            if proc.returncode == 0 or "Connection refused" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and "data 2" in summary["layout"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


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


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["NL_PRETRAIN_FAULT_KILL", "NL_PRETRAIN_FAULT_KILL_SAVE"])
def test_kill_one_torchrun_rank_then_resume_loses_nothing(tmp_path, fault):
    """DP2 ZeRO-1 under torchrun: rank 1 is SIGKILLed during step 5 (``NL_PRETRAIN_FAULT_KILL``) or
    while it writes the step-4 checkpoint (``NL_PRETRAIN_FAULT_KILL_SAVE``); torchrun takes the job
    down. ``--resume auto`` on the same two ranks continues from the newest complete checkpoint,
    metrics.jsonl holds every step once, and the final weights equal those of an uninterrupted
    two-rank run bit for bit."""
    import torch
    args = [*TINY, "--parallel.zero_stage=1", "--train.steps=6", "--checkpoint.every=2", "--checkpoint.keep_last=0"]

    def launch(run_dir, port, resume=False, **env):
        e = _env(THREADS="1", **env)
        e["MASTER_PORT"] = str(int(e["MASTER_PORT"]) + port)
        cmd = ["bash", "launch/local.sh", "-n", "2", *args, f"--train.run_dir={run_dir}"]
        return subprocess.run(cmd + (["--resume", "auto"] if resume else []), cwd=ROOT, capture_output=True,
                              text=True, env=e, timeout=400)

    run, ref = tmp_path / "killed", tmp_path / "straight"
    during_save = fault == "NL_PRETRAIN_FAULT_KILL_SAVE"
    back = 2 if during_save else 4
    killed = launch(run, 11, resume=True, **{fault: "1:4" if during_save else "1:5"})
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{back:08d}"
    resumed = launch(run, 12, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {back}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    straight = launch(ref, 13)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    shard = "shard-tp000-pp000-dp00000.pt"
    got = torch.load(run / "checkpoints" / "step-00000006" / shard, weights_only=False)["records"]
    want = torch.load(ref / "checkpoints" / "step-00000006" / shard, weights_only=False)["records"]
    assert got.keys() == want.keys()
    for name, rec in want.items():
        for key, value in rec.items():
            assert torch.equal(got[name][key], value), f"{name}.{key}"
