"""``nl-pretrain generate`` and ``nl-pretrain eval``: argparse wiring and the two handlers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

EVAL_TASKS = ("loss", "passkey")


def register(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a checkpoint or an export (streams as it decodes)")
    g.add_argument("--checkpoint", required=True, help="a step-XXXXXXXX checkpoint, a checkpoint root (newest), "
                                                       "or an `nl-pretrain export` directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a file whose whole text is the prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (0.8)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the tokens of this probability mass (1.0)")
    g.add_argument("--seed", type=int, default=0)
    _common(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="held-out loss/perplexity, loss by position (JSON + PNG), S-NIAH-1 passkey")
    e.add_argument("--checkpoint", required=True, help="a checkpoint (dir or root) or an export directory")
    data = e.add_mutually_exclusive_group()
    data.add_argument("--dataset", help="a prepared dataset (its validation split; default: the run's own)")
    data.add_argument("--text", help="a directory of text files (each one document), tokenized with the run's "
                                     "tokenizer")
    e.add_argument("--tasks", default="loss", help=f"comma-separated, of {', '.join(EVAL_TASKS)} (loss)")
    e.add_argument("--seq-len", type=int, default=0,
                   help="tokens per held-out sequence (default: the run's data.seq_len)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--max-batches", type=int, default=16, help="held-out batches to evaluate (16)")
    e.add_argument("--passkey-lengths", default="1024,4096,16384", help="prompt lengths in tokens (1024,4096,16384)")
    e.add_argument("--passkey-trials", type=int, default=5, help="prompts per length (5)")
    e.add_argument("--out", default="", help="where eval.json and positions.png go (default: eval-step-N/ next "
                                             "to the checkpoint, or <export>/eval)")
    _common(e)
    e.set_defaults(func=cmd_eval)


def _common(p) -> None:
    p.add_argument("--tokenizer", default=None, help="override the carried tokenizer: a tokenizer.json, a prepared "
                                                     "dataset directory, or 'bytes' (the built-in byte corpus)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def _session(args):
    import torch
    from nl_pretrain.infer.session import Session
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    return Session.load(args.checkpoint, device=args.device, tokenizer=args.tokenizer)


def cmd_generate(args) -> int:
    from nl_pretrain.infer.sampling import check_sampling
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.prompt_file is not None:
        if not Path(args.prompt_file).is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file}: no such file")
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    session = _session(args)
    ids = session.encode_prompt(prompt)
    session.check_length(len(ids) + args.max_new_tokens, f"a prompt of {len(ids)} tokens + {args.max_new_tokens} "
                                                          f"new tokens")

    def show(row, text):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write(prompt)
    sys.stdout.flush()
    gen = session.generate([ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                           stream=show)
    kind = "KV cache, grows with the context" if session.attention else "constant in the context"
    print(f"\n-- {gen.new_tokens} tokens in {gen.decode_s:.2f} s: {gen.tokens_per_s:.1f} tokens/s "
          f"(prefill {len(ids)} tokens in {gen.prefill_s:.2f} s); state {gen.state_bytes:,} bytes per sequence "
          f"({kind})")
    return 0


def parse_tasks(text: str):
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks {text}: unknown task {', '.join(bad) or '(none given)'}; choose from "
                         f"{', '.join(EVAL_TASKS)}")
    return tasks


def parse_lengths(text: str):
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--passkey-lengths {text}: give positive token counts separated by commas, e.g. 1024,4096")
    return lengths


def cmd_eval(args) -> int:
    from nl_pretrain.eval.heldout import batched, heldout_loss, plot_positions, text_windows
    from nl_pretrain.eval.passkey import run_passkey
    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.passkey_lengths) if "passkey" in tasks else []
    for name, v in (("--batch-size", args.batch_size), ("--max-batches", args.max_batches),
                    ("--passkey-trials", args.passkey_trials)):
        if v < 1:
            raise ValueError(f"{name} {v} must be >= 1")
    session = _session(args)
    from nl_pretrain.eval.passkey import check_lengths
    check_lengths(session.tokenizer, lengths)
    for n in lengths:
        session.check_length(n + 8, f"--passkey-lengths {n}")
    cfg = session.config
    seq_len = args.seq_len or cfg.data.seq_len
    if "loss" in tasks:
        session.check_length(seq_len, f"--seq-len {seq_len}")
    out_dir = Path(args.out) if args.out else _default_out(args.checkpoint)
    report = {"checkpoint": session.source, "model": cfg.model.preset or cfg.model.family}
    if "loss" in tasks:
        if args.text:
            rows, source = batched(text_windows(args.text, session.tokenizer, seq_len), args.batch_size), args.text
        else:
            dataset = args.dataset or cfg.data.dataset
            if not dataset:
                raise ValueError("the run trained on the built-in byte corpus: pass --text DIR (a directory of text) "
                                 "or --dataset DIR (a prepared dataset) to evaluate on")
            from data_pipeline import TokenLoader
            loader = TokenLoader(dataset, "val", args.batch_size, loop=False)
            if loader.vocab_size > cfg.model.vocab_size:
                raise ValueError(f"--dataset {dataset} has a vocabulary of {loader.vocab_size}, the model "
                                 f"{cfg.model.vocab_size}; evaluate on data prepared with the model's tokenizer")
            if args.seq_len and args.seq_len != loader.seq_len:
                raise ValueError(f"--seq-len {args.seq_len}: the dataset's sequences have {loader.seq_len} tokens; "
                                 f"leave --seq-len out or use --text")
            seq_len, rows, source = loader.seq_len, iter(loader), dataset
        res = heldout_loss(session.model, rows, seq_len, args.max_batches, session.device)
        res["data"] = source
        report["heldout"] = res
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_positions(res, str(out_dir / "positions.png"), f"{report['model']}: loss by position ({source})")
        print(f"held-out loss {res['loss']:.4f} (perplexity {res['ppl']:.2f}) over {res['tokens']:,} tokens "
              f"({res['sequences']} sequences of {seq_len})")
        for b in res["buckets"]:
            if b["loss"] is not None:
                print(f"  positions [{b['start']:>6}, {b['end']:>6}): loss {b['loss']:.4f} ({b['tokens']:,} tokens)")
    if "passkey" in tasks:
        pk = run_passkey(session, lengths, args.passkey_trials)
        report["passkey"] = pk
        for r in pk["lengths"]:
            print(f"passkey (S-NIAH-1) at {r['length']:>6} tokens: accuracy {r['accuracy']:.2f} ({r['trials']} trials)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'eval.json'}" + (f" and {out_dir / 'positions.png'}" if "loss" in tasks else ""))
    return 0


def _default_out(checkpoint: str) -> Path:
    p = Path(checkpoint)
    if (p / "model.safetensors").is_file():
        return p / "eval"
    from nl_pretrain.checkpoint.export import resolve_checkpoint
    ck = resolve_checkpoint(checkpoint)
    return ck.parent.parent / f"eval-{ck.name}"
