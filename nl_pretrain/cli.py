"""``nl-pretrain``: train, info, export, plan, prepare-data, verify-data.

A user-facing failure is one ``error:`` line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

from nl_pretrain.config import ConfigError, load_config


def count_parameters(model_cfg) -> "OrderedDict[str, int]":
    """Parameters per component, built on the meta device (no memory, any size)."""
    import torch
    from nl_pretrain.model import LanguageModel
    with torch.device("meta"):
        model = LanguageModel(model_cfg)
    counts: "OrderedDict[str, int]" = OrderedDict()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            if parts[2] == "levels":
                lvl = model_cfg.cms[int(parts[3])]
                key = f"cms[{parts[3]}] {lvl.kind} (period {lvl.period})"
            elif parts[2] == "mixer":
                key = "mixer: " + ("attention" if model_cfg.family in ("transformer", "hope_attention")
                                   else "self-modifying titans")
            else:
                key = "norms"
        else:
            key = {"embed": "embedding", "lm_head": "lm head", "norm": "norms"}[parts[0]]
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def cmd_info(args) -> int:
    cfg = load_config(args.config, args.overrides)
    counts = count_parameters(cfg.model)
    m = cfg.model
    print(f"model {m.preset or m.family}: {m.n_layers} layers, d={m.d_model}, {m.n_heads} heads, "
          f"vocab {m.vocab_size}, tied embeddings {m.tie_embeddings}")
    from nl_pretrain.optim.optimizer import role_summary
    print("\n".join(role_summary(cfg.model, cfg.optim)))     # which tensors get which update rule
    for k, v in counts.items():
        print(f"  {k:38s} {v:>15,}")
    print(f"parameters: {sum(counts.values())}")                # the total stays the last line
    return 0


def cmd_train(args) -> int:
    import os
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from nl_pretrain.config import resolve_token_periods      # CMS periods in tokens -> steps
    resolve_token_periods(cfg, max(1, (args.world_size or world) // (cfg.parallel.tensor * cfg.parallel.pipeline)))
    if args.dry_run:
        from nl_pretrain.parallel.dryrun import dry_run_report
        print(dry_run_report(cfg, args.world_size or world, args.global_batch, args.gpu_memory))
        return 0
    from nl_pretrain.train.preflight import RunFinished, preflight
    try:        # device, layout, data, resume: before any process group, model or file
        preflight(cfg, world)
    except RunFinished as done:
        if os.environ.get("RANK", "0") == "0":
            print(done, flush=True)
        return 0
    p = cfg.parallel
    if world > 1 or p.tensor > 1 or p.pipeline > 1 or p.zero_stage > 0:
        from nl_pretrain.parallel.topology import shutdown
        from nl_pretrain.parallel.trainer import train_distributed
        try:
            summary = train_distributed(cfg)
        finally:
            shutdown()
    else:
        from nl_pretrain.train.loop import train
        summary = train(cfg)
    if summary.get("finished"):
        return 0
    if "val_loss" in summary and os.environ.get("RANK", "0") == "0":
        print(f"done: held-out loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.2f}), "
              f"checkpoint {summary.get('checkpoint', '-')}")
    return 0


def cmd_export(args) -> int:
    if args.format not in EXPORT_FORMATS:
        raise ValueError(f"--format {args.format}: unknown export format; use --format safetensors (model.safetensors "
                         f"+ config.yaml, the default) or --format hf (a directory transformers loads)")
    if args.format == "hf":                  # docs/INFERENCE.md, "Hugging Face export"
        from nl_pretrain.hf.export import export_hf
        info = export_hf(args.checkpoint, args.out, args.tokenizer)
        print(f"exported {info['checkpoint']} for transformers: {info['parameters']:,} parameters -> {info['out']} "
              f"({', '.join(info['files'])})")
        return 0
    if args.tokenizer is not None:
        raise ValueError("--tokenizer applies to --format hf only (the safetensors export copies the tokenizer "
                         "the checkpoint carries); drop it")
    from nl_pretrain.checkpoint.export import export_checkpoint
    info = export_checkpoint(args.checkpoint, args.out)
    print(f"exported step {info['step']} of {info['checkpoint']}: {info['parameters']:,} parameters in "
          f"{info['tensors']} tensors -> {info['out']}/model.safetensors (+ config.yaml"
          f"{', tokenizer.json' if info.get('tokenizer') else '; no tokenizer: the checkpoint predates them'})")
    return 0


def cmd_lm_eval(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("nl-pretrain lm-eval needs the lm-eval package; install the eval extra "
                         "(pip install -e '.[eval]' -c constraints-cpu.txt)") from None
    from nl_pretrain.lm_eval_adapter import run_lm_eval     # docs/INFERENCE.md, "lm-eval"
    return run_lm_eval(args.checkpoint, args.overrides, args.tokenizer)


EXPORT_FORMATS = ("safetensors", "hf")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nl-pretrain", description="Pretraining for HOPE and its baselines")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", cmd_train, "train a model"),
                            ("info", cmd_info, "print parameter counts of a config")):
        s = sub.add_parser(name, help=help_,
                           epilog="any --section.key=value after the options overrides the config")
        s.add_argument("--config", help="YAML file (see configs/)")
        if name == "train":
            s.add_argument("--dry-run", action="store_true",
                           help="check the parallel layout and print what lives on each rank; train nothing")
            s.add_argument("--world-size", type=int, default=0,
                           help="with --dry-run: processes to plan for (default: $WORLD_SIZE or 1)")
            s.add_argument("--global-batch", type=int, default=None,
                           help="with --dry-run: check this global batch (sequences) against the layout")
            s.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                           help="with --dry-run: GPU memory per rank for the fits / does not fit verdict (default 80)")
            s.add_argument("--resume", default=None, metavar="auto|DIR",
                           help="continue from the newest complete checkpoint (auto) or from DIR "
                                "(same as --train.resume=...)")
        s.set_defaults(func=fn)
    e = sub.add_parser("export", help="write one consolidated model (safetensors + config) from any checkpoint")
    e.add_argument("--checkpoint", required=True, help="a step-XXXXXXXX checkpoint dir, or a checkpoint root (newest)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--format", default="safetensors", metavar="|".join(EXPORT_FORMATS),
                   help="safetensors (default): model.safetensors + config.yaml; hf: a transformers directory "
                        "(also from an export dir)")
    e.add_argument("--tokenizer", default=None, metavar="PATH|bytes",
                   help="--format hf: the tokenizer when the checkpoint carries none (tokenizer.json, dataset dir, bytes)")
    e.set_defaults(func=cmd_export)
    le = sub.add_parser("lm-eval", help="run lm-evaluation-harness on a checkpoint or export",
                        epilog="every other option goes to `lm-eval run` (--tasks, --include_path, --limit, "
                               "--output_path, --batch_size, --model_args dtype=float64, ...)")
    le.add_argument("--checkpoint", required=True, help="a checkpoint dir or root, or an nl-pretrain export dir")
    le.add_argument("--tokenizer", default=None, metavar="PATH|bytes",
                    help="when the checkpoint carries none: tokenizer.json, dataset dir, or bytes")
    le.set_defaults(func=cmd_lm_eval)
    from nl_pretrain.infer import commands as infer_commands     # generate, eval (docs/INFERENCE.md)
    infer_commands.register(sub)
    from nl_pretrain.parallel.plan import register as register_plan
    register_plan(sub)                       # nl-pretrain plan: layouts that fit a cluster (parallel/plan.py)
    try:
        from data_pipeline import cli as data_cli
        data_cli.register(sub)
    except ImportError:
        pass
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = [r for r in rest]
    if getattr(args, "resume", None):
        args.overrides.append(f"--train.resume={args.resume}")
    if rest and args.command not in ("train", "info", "lm-eval", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from nl_pretrain.checkpoint.store import CheckpointError
    from nl_pretrain.train.rundir import RunDirBusy
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError, RunDirBusy, FloatingPointError) as exc:
        # one line: what failed, the value, the fix (the messages say all three)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
