"""``nl-pretrain prepare-data``: argparse wiring only (Ray and torch are imported by the handler)."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare-data", help="tokenize a corpus into packed WebDataset shards",
        description="Train (or load) a byte-level BPE tokenizer, tokenize and pack documents into fixed-length "
                    "samples, and write WebDataset tar shards plus manifest.json (see docs/DATA.md).")
    p.add_argument("--source", action="append", metavar="PATH",
                   help="'default' (the Python stdlib .py files) or a directory / file of .txt, .md, .py, .jsonl, "
                        ".parquet; repeat for several sources (default: default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary incl. special tokens (32000)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per training sample (4096)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: CPU count); 0 = no Ray, run in this process")
    p.add_argument("--seed", type=int, default=0, help="keys the train/validation split hash (0)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (0.01)")
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .parquet (text)")
    p.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json instead of training one")
    p.add_argument("--max-documents", type=int, default=0, help="keep only the first N documents (0 = all)")
    p.add_argument("--shard-samples", type=int, default=0, help="samples per shard (default: ~64 MiB shards)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--ray-address", help="connect to this Ray cluster (default: $RAY_ADDRESS or a local one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's size and sha256 afterwards (if --out already holds a dataset and "
                        "--overwrite is not given: only check it)")
    p.set_defaults(func=run)
    v = subparsers.add_parser("verify-data", help="check every shard of a prepared dataset against its manifest",
                              description="Check that every shard and index file of a prepared dataset is present, "
                                          "of the recorded size and (unless --size-only) matches its sha256.")
    v.add_argument("dataset", metavar="DIR", help="a prepared dataset directory (holds manifest.json)")
    v.add_argument("--size-only", action="store_true", help="check presence and sizes only (no reading)")
    v.set_defaults(func=run_verify)
    return p


def verify(dataset: str, full: bool = True) -> int:
    """Print what is wrong with ``dataset`` (every bad file); 0 if nothing, 2 otherwise."""
    from data_pipeline.manifest import dataset_problems
    try:
        m, problems = dataset_problems(dataset, full=full)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = "sizes and sha256" if full else "sizes"
    if problems:
        for line in problems:
            print(f"  bad: {line}", file=sys.stderr)
        print(f"error: {dataset}: {len(problems)} of {m['_files_checked']} files fail the check ({what}); "
              f"prepare the dataset again (nl-pretrain prepare-data --overwrite --out {dataset} ...), or train "
              f"with --data.skip_corrupt=true to skip the unreadable samples", file=sys.stderr)
        return 2
    print(f"dataset {dataset}: {m['_files_checked']} files ok ({what}), fingerprint {m['fingerprint'][:16]}")
    return 0


def run_verify(args) -> int:
    return verify(args.dataset, full=not args.size_only)


def run(args) -> int:
    from pathlib import Path
    from data_pipeline.prepare import prepare_dataset
    if args.verify and (Path(args.out) / "manifest.json").exists() and not args.overwrite:
        return verify(args.out)
    sources = args.source or ["default"]
    try:
        m = prepare_dataset(sources if len(sources) > 1 else sources[0], args.out, vocab_size=args.vocab_size,
                            seq_len=args.seq_len, workers=args.workers, seed=args.seed,
                            val_fraction=args.val_fraction, text_field=args.text_field,
                            tokenizer_path=args.tokenizer, max_documents=args.max_documents,
                            shard_samples=args.shard_samples, overwrite=args.overwrite,
                            ray_address=args.ray_address, progress=not args.no_progress)
    except (OSError, ValueError) as exc:
        import errno
        msg = str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            msg += (f"; the disk holding {args.out} is full: free space or choose another --out, then run "
                    f"prepare-data again (the partial output has no manifest.json, so nothing trains on it)")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    r = m["report"]
    print(f"dataset {args.out}: vocab {m['vocab_size']}, seq_len {m['seq_len']}, fingerprint {m['fingerprint'][:16]}")
    for split, s in m["splits"].items():
        print(f"  {split:5s} {s['documents']:>9,} documents {s['tokens']:>13,} tokens {s['samples']:>9,} samples "
              f"{len(s['shards']):>4} shards ({s['padding_tokens']} padding tokens)")
    d = m["documents"]
    if d["invalid_utf8_bytes"] or d["empty_documents"]:
        print(f"  {d['invalid_utf8_bytes']} invalid UTF-8 bytes replaced in {d['invalid_utf8_documents']} documents; "
              f"{d['empty_documents']} empty documents skipped")
    print(f"  {r['seconds']['total']:.1f} s ({r['seconds']['tokenizer']:.1f} s tokenizer), "
          f"{r['tokens_per_s']:,.0f} tokens/s tokenize+pack+write with {r['workers']} workers")
    return verify(args.out) if args.verify else 0
