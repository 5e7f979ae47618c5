"""Run `nl-pretrain train` on a Ray cluster with Ray Train's TorchTrainer (one worker per rank).

    python launch/ray_train.py --num-workers 2 -- --config configs/tiny_hope.yaml --parallel.tensor=2
    ray job submit --working-dir . -- python launch/ray_train.py --address auto --num-workers 8 --gpu --
        --config configs/tiny_hope.yaml --data.dataset=/shared/ds --train.run_dir=/shared/runs/x

(``ray job submit`` needs ``ray[default]``: ``pip install -e '.[ray]'``; the job runs in an uploaded copy
of the directory without what .gitignore names, such as data/ and runs/, so give those as absolute
paths on storage every node sees.)

Arguments after ``--`` go to ``nl-pretrain train`` unchanged; every worker runs the same entry point
and config as torchrun would (Ray Train sets RANK / WORLD_SIZE / MASTER_ADDR and starts the process
group: gloo on CPU, NCCL with --gpu). Workers do not run in the caller's directory, so the driver
turns every path (--config, train.run_dir, data.dataset, data.source, checkpoint.dir, a resume
directory; given on the command line or in the config file) into an absolute one against the caller's
directory before they are sent. It also checks the configuration (`nl-pretrain train`'s preflight:
config, layout, device, data, resume) before Ray starts: a configuration error is one `error:` line
and exit 2, never retried.

Recovery: when a worker dies (SIGKILL, OOM, a lost node) or raises, Ray Train kills the whole worker
group (so no surviving rank waits in a collective for a dead peer), starts a new one and calls the
training function again, up to --max-failures times. Every worker runs with --train.resume=auto
(unless you pass a --train.resume / --resume of your own), so a fresh run starts at step 0 and a
restarted group continues from the newest complete checkpoint. Progress since that checkpoint is
lost: set --checkpoint.every=N. On a multi-node cluster the run_dir (or --checkpoint.dir) must be on
a filesystem every node sees, since a restarted rank may land on another node. A worker that fails
after the driver's checks (e.g. a checkpoint written for another model) is retried like a crash.
A restarted rank 0 waits up to 15 s for the run directory's lock (NL_PRETRAIN_LOCK_WAIT_S).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # nl_pretrain, uninstalled too

# forwarded from the launching process to every worker (fault injection for the recovery test)
FORWARDED_ENV = ("NL_PRETRAIN_FAULT_KILL", "NL_PRETRAIN_FAULT_KILL_SAVE", "NL_PRETRAIN_FAULT_NAN_STEPS",
                 "NL_PRETRAIN_LOCK_WAIT_S")
# config keys that name files or directories (relative ones are resolved against the caller's cwd)
PATH_KEYS = ("train.run_dir", "data.dataset", "data.source", "checkpoint.dir", "train.resume")
_KEEP = {"data.source": ("default", ""), "train.resume": ("auto", "")}


def absolute_args(train_args: list, cwd: str) -> list:
    """``train_args`` with --config, --resume and every path key resolved against ``cwd``; the config
    file's own relative paths become overrides too (checked: the config loads)."""
    from nl_pretrain.config import load_config, parse_overrides

    def absolute(key: str, value: str) -> str:
        if value in _KEEP.get(key, ("",)) or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(cwd, value))

    out, config, i = [], None, 0
    while i < len(train_args):
        a = train_args[i]
        for flag, key in (("--config", None), ("--resume", "train.resume")):
            if a == flag and i + 1 < len(train_args):
                value = absolute(key or "config", train_args[i + 1])
                out += [flag, value]
                config = value if flag == "--config" else config
                i += 2
                break
            if a.startswith(flag + "="):
                value = absolute(key or "config", a.split("=", 1)[1])
                out.append(f"{flag}={value}")
                config = value if flag == "--config" else config
                i += 1
                break
        else:
            if a.startswith("--") and "=" in a and a[2:].split("=", 1)[0] in PATH_KEYS:
                key, value = a[2:].split("=", 1)
                a = f"--{key}={absolute(key, value)}"
            out.append(a)
            i += 1
    overrides = [a for a in out if a.startswith("--") and "=" in a and not a.startswith(("--config=", "--resume="))]
    parse_overrides(overrides)
    cfg = load_config(config, overrides)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if absolute(key, value) != value:
            out.append(f"--{key}={absolute(key, value)}")
    return out


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

    # the configuration is checked here, once, before any Ray worker exists (and is never retried)
    from nl_pretrain.config import ConfigError, load_config
    from nl_pretrain.train.preflight import RunFinished, preflight
    try:
        train_args = with_auto_resume(absolute_args(train_args, os.getcwd()))
        cfg = load_config(_config_of(train_args), [a for a in train_args if a.startswith("--") and "=" in a
                                                   and not a.startswith(("--config=", "--resume="))]
                          + _resume_of(train_args))
        preflight(cfg, world=args.num_workers, is_launched=True)
    except RunFinished as done:
        print(done, flush=True)
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

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
    env.setdefault("NL_PRETRAIN_LOCK_WAIT_S", "15")     # a restarted group: the old rank 0 may still exit
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"args": train_args, "gpu": args.gpu, "root": root, "env": env},
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


def _config_of(train_args: list):
    for i, a in enumerate(train_args):
        if a == "--config" and i + 1 < len(train_args):
            return train_args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _resume_of(train_args: list) -> list:
    for i, a in enumerate(train_args):
        if a == "--resume" and i + 1 < len(train_args):
            return [f"--train.resume={train_args[i + 1]}"]
        if a.startswith("--resume="):
            return [f"--train.resume={a.split('=', 1)[1]}"]
    return []


if __name__ == "__main__":
    sys.exit(main())
