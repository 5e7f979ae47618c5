"""Run `nl-pretrain train` on a Ray cluster with Ray Train's TorchTrainer (one worker per rank).

    python launch/ray_train.py --num-workers 2 -- --config configs/tiny_hope.yaml --parallel.tensor=2
    ray job submit --working-dir . -- python launch/ray_train.py --address auto --num-workers 8 --gpu -- ...

Arguments after ``--`` go to ``nl-pretrain train`` unchanged; every worker runs the same entry point
and config as torchrun would (Ray Train sets RANK / WORLD_SIZE / MASTER_ADDR and starts the process
group: gloo on CPU, NCCL with --gpu). Use an absolute --train.run_dir: workers do not share the cwd.

Recovery: when a worker dies (SIGKILL, OOM, a lost node) or raises, Ray Train kills the whole worker
group (so no surviving rank waits in a collective for a dead peer), starts a new one and calls the
training function again, up to --max-failures times. Every worker runs with --train.resume=auto
(unless you pass a --train.resume / --resume of your own), so a fresh run starts at step 0 and a
restarted group continues from the newest complete checkpoint. Progress since that checkpoint is
lost: set --checkpoint.every=N. On a multi-node cluster the run_dir (or --checkpoint.dir) must be on
a filesystem every node sees, since a restarted rank may land on another node. Ray cannot tell a
crash from a bad config: a worker that exits with an error is retried too (check the config with
`nl-pretrain train --dry-run` first).
"""
from __future__ import annotations

import argparse
import os
import sys

# forwarded from the launching process to every worker (fault injection for the recovery test)
FORWARDED_ENV = ("NL_PRETRAIN_FAULT_KILL", "NL_PRETRAIN_FAULT_NAN_STEPS")


def _worker(config: dict) -> None:
    os.environ.update(config["env"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["gpu"] else "cpu")
    sys.path.insert(0, config["root"])
    from nl_pretrain.cli import main
    rc = main(["train", *config["args"]])
    if rc:
        raise RuntimeError(f"nl-pretrain train exited with {rc}")


def with_auto_resume(train_args: list) -> list:
    """``train_args`` plus ``--train.resume=auto`` unless they already say how to resume."""
    own = any(a.startswith(("--train.resume=", "--resume=")) or a == "--resume" for a in train_args)
    return list(train_args) if own else [*train_args, "--train.resume=auto"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' inside `ray job submit`); "
                                                   "default: start a local cluster")
    p.add_argument("--storage-path", default=os.path.abspath("runs/ray"))
    p.add_argument("--num-cpus", type=int, default=None, help="local cluster only: CPUs to give it")
    p.add_argument("--max-failures", type=int, default=3,
                   help="worker-group restarts before the run fails (-1: no limit); each resumes from the "
                        "newest checkpoint")
    args = p.parse_args(ours)

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "DS_ACCELERATOR": "cuda" if args.gpu else "cpu",
                                           "OMP_NUM_THREADS": "1"}})
    # through the loop config, not ray.init's runtime_env: this reaches the workers with --address as well
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"args": with_auto_resume(train_args), "gpu": args.gpu, "root": root, "env": env},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        run_config=RunConfig(storage_path=os.path.abspath(args.storage_path), name="nl-pretrain",
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
