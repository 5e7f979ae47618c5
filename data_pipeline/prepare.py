"""``prepare_dataset``: source -> tokenizer -> packed WebDataset shards + manifest, on Ray.

Flow (docs/DATA.md has the user-facing version):
1. The driver lists the source into units (sources.py) and groups consecutive units into tasks.
2. The tokenizer is trained in the driver on the train-split documents (or a given one is loaded)
   and written to ``tokenizer.json``.
3. Ray tasks read, decode, split and tokenize their group (``tokenize_group``); their token arrays
   stay in the object store. The driver consumes the groups *in order* and, per split, appends them
   to the packed stream; as soon as the stream covers a shard, a second task packs and serialises
   that shard (``pack_shard``); the driver writes each returned shard atomically.
4. Once every shard is on disk, ``report.json`` (timings) and last ``manifest.json`` are written.
The output depends only on the documents, the tokenizer and the options, never on how units were
grouped or how many workers ran: 1 and N workers give byte-identical directories.

``workers=0`` runs the same task functions in this process without Ray (debugging). The task bodies
are in packing.py, the executors in executors.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from data_pipeline import shards as sh
from data_pipeline.executors import InlineExecutor, RayExecutor
from data_pipeline.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, write_manifest
from data_pipeline.packing import SPLITS, ShardSpec, SplitPacker
from data_pipeline.sources import SourceError, SourceSpec, Unit, is_validation, list_units, read_unit
from data_pipeline.tokenizer import TOKENIZER_FILE, TextTokenizer, prepare_given, sha256_bytes, train_bpe

SHARD_BYTES = 64 << 20
OWN_FILES = re.compile(r"^(?:(?:train|val)-\d{6}\.(?:tar|idx\.npy)|tokenizer\.json|report\.json|manifest\.json"
                       r"|\..+\.tmp-\d+)$")
PACKING_RULE = ("per split, documents in order as [BOS] tokens [EOS], concatenated; sample i = "
                "stream[i*T : i*T+T+1] (windows overlap by the one label token); the last window is "
                "right-padded with PAD; samples = ceil(tokens / T); cu_seqlens marks document segments")


# --------------------------------------------------------------------------------------- driver
def _group_units(units: List[Unit], workers: int) -> List[List[Unit]]:
    total = sum(u.size for u in units)
    target = min(max(total // (4 * max(workers, 1)), 256 << 10), 16 << 20)
    groups, cur, size = [], [], 0
    for u in units:
        cur.append(u)
        size += u.size
        if size >= target:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out '{out}' is a file; pass a directory path")
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"'{out}' already holds a prepared dataset ({MANIFEST_FILE}); pass --overwrite "
                              f"to replace it or choose another --out")


def _clean_out_dir(out: Path) -> None:
    if (out / MANIFEST_FILE).exists():
        (out / MANIFEST_FILE).unlink()       # first: from here on the directory is not a dataset
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():                  # leftovers of an interrupted run; other files stay
        if p.is_file() and OWN_FILES.match(p.name):
            p.unlink()


def _training_texts(units: List[Unit], text_field: str, val_fraction: float, seed: int, max_bytes: int,
                    stats: dict):
    for unit in units:
        for doc in read_unit(unit, text_field):
            if not doc.data or is_validation(doc.data, val_fraction, seed):
                continue
            stats["documents"] += 1
            stats["bytes"] += len(doc.data)
            yield doc.text
            if stats["bytes"] >= max_bytes:
                return


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def prepare_dataset(source: SourceSpec = None, out_dir: str = "data/stdlib", vocab_size: int = 32000,
                    seq_len: int = 4096, workers: Optional[int] = None, seed: int = 0, val_fraction: float = 0.01,
                    text_field: str = "text", tokenizer_path: Optional[str] = None, *, max_documents: int = 0,
                    shard_samples: int = 0, overwrite: bool = False, ray_address: Optional[str] = None,
                    progress: bool = True, tokenizer_train_bytes: int = 1 << 30) -> dict:
    """Prepare a tokenized, packed dataset in ``out_dir`` and return its manifest (see module doc)."""
    t0 = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if seq_len < 2:
        raise ValueError(f"seq_len ({seq_len}) must be at least 2")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must be in [0, 1); e.g. 0.01 holds out 1% of documents")
    if workers < 0:
        raise ValueError(f"workers ({workers}) must be >= 0 (0 = no Ray, everything in this process)")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)                           # before any work
    listing = list_units(source, text_field, max_documents)
    given = prepare_given(tokenizer_path) if tokenizer_path else None
    _clean_out_dir(out)

    # ---- tokenizer
    t_tok = time.perf_counter()
    tok_info: dict
    if given is None:
        stats = {"documents": 0, "bytes": 0}
        _log(progress, f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the train documents ...")
        tok_json = train_bpe(_training_texts(listing.units, text_field, val_fraction, seed,
                                             tokenizer_train_bytes, stats), vocab_size)
        if stats["documents"] == 0:
            raise SourceError(f"source {_names(listing)} holds no non-empty training documents; point --source "
                              f"at text (or lower --val-fraction, now {val_fraction})")
        tok_info = {"source": "trained", "vocab_size_requested": vocab_size, "training_documents": stats["documents"],
                    "training_bytes": stats["bytes"], "training_bytes_cap": tokenizer_train_bytes}
    else:
        tok_json, added = given
        tok_info = {"source": "given", "given_path": str(Path(tokenizer_path).resolve()),
                    "added_special_tokens": added}
    tok_bytes = tok_json.encode("utf-8")
    sh.atomic_write(out / TOKENIZER_FILE, tok_bytes)
    tok = TextTokenizer(tok_json)
    tok_seconds = time.perf_counter() - t_tok
    token_dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    itemsize = np.dtype(token_dtype).itemsize
    if not shard_samples:
        per_sample = 3 * sh.BLOCK + -(-(128 + (seq_len + 1) * itemsize) // sh.BLOCK) * sh.BLOCK
        shard_samples = max(1, SHARD_BYTES // per_sample)

    # ---- tokenize, pack, write
    t_start = time.perf_counter()
    ex = InlineExecutor() if workers == 0 else RayExecutor(workers, ray_address)
    t_run = time.perf_counter()
    try:
        totals, shard_records = _run(ex, listing, text_field, tok_json, tok, val_fraction, seed, seq_len,
                                     shard_samples, token_dtype, out, progress)
    finally:
        if isinstance(ex, RayExecutor):
            ex.close()
    run_seconds = time.perf_counter() - t_run

    if totals["train_documents"] == 0:
        if totals["documents"] == totals["empty_documents"]:
            raise SourceError(f"source {_names(listing)} holds no non-empty documents ({totals['documents']} empty); "
                              f"point --source at text")
        raise SourceError(f"every document of {_names(listing)} hashed into validation (val_fraction="
                          f"{val_fraction}); lower --val-fraction")
    warnings = []
    if val_fraction > 0 and totals["val_documents"] == 0:
        warnings.append(f"the val split is empty: no document hashed below val_fraction={val_fraction}; "
                        f"use more documents or a larger --val-fraction")
        _log(progress, "warning: " + warnings[-1])
    manifest = _build_manifest(listing, totals, shard_records, tok, tok_bytes, tok_info, seq_len, token_dtype,
                               seed, val_fraction, text_field, max_documents, shard_samples, warnings)
    splits = manifest["splits"]
    total_tokens = sum(splits[s]["tokens"] for s in SPLITS)
    report = {"workers": workers, "executor": "inline" if workers == 0 else "ray",
              "seconds": {"tokenizer": round(tok_seconds, 3), "ray_start": round(t_run - t_start, 3),
                          "tokenize_pack_write": round(run_seconds, 3),
                          "total": round(time.perf_counter() - t0, 3)},
              "tokens": total_tokens, "tokens_per_s": round(total_tokens / max(run_seconds, 1e-9), 1)}
    sh.atomic_write(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    manifest = write_manifest(out, manifest)                 # last: only now is the directory a dataset
    manifest["report"] = report       # returned to the caller, not stored in the manifest
    return manifest


def _build_manifest(listing, totals, shard_records, tok, tok_bytes, tok_info, seq_len, token_dtype, seed,
                    val_fraction, text_field, max_documents, shard_samples, warnings) -> dict:
    h = hashlib.sha256()
    for u, digest in zip(listing.units, totals["unit_sha256"]):
        h.update(f"{u.source_index}:{u.rel}:{u.part}:{digest}\n".encode())
    splits = {}
    by_split = {s: sorted(({k: v for k, v in r.items() if k != "split"} for r in shard_records if r["split"] == s),
                          key=lambda r: r["first_sample"]) for s in SPLITS}
    for split in SPLITS:
        L, D = totals[f"{split}_tokens"], totals[f"{split}_documents"]
        n = sh.num_samples(L, seq_len)
        splits[split] = {"documents": D, "tokens": L, "text_tokens": L - 2 * D, "samples": n,
                         "padding_tokens": n * seq_len - L, "label_tokens": L - D,
                         "shards": by_split[split]}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "seq_len": seq_len, "sample_tokens": seq_len + 1, "token_dtype": token_dtype,
        "vocab_size": tok.vocab_size,
        "special_tokens": {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id},
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_bytes(tok_bytes), **tok_info},
        "seed": seed, "val_fraction": val_fraction,
        "split_rule": "val when blake2b-64(document utf-8, key='nl-pretrain-split'+seed) / 2**64 < val_fraction",
        "text_field": text_field, "max_documents": max_documents,
        "sources": listing.sources, "documents_sha256": h.hexdigest(),
        "documents": {k: totals[k] for k in ("documents", "empty_documents", "invalid_utf8_documents",
                                             "invalid_utf8_bytes", "raw_bytes")},
        "packing": PACKING_RULE, "samples_per_shard": shard_samples,
        "sample_members": {"tokens.npy": f"{token_dtype}[seq_len+1]", "cu_seqlens.npy": "int32[k+1]"},
        "splits": splits, "warnings": warnings,
    }
    return manifest


def _names(listing) -> str:
    return ", ".join(f"'{s['spec']}'" for s in listing.sources)


def _run(ex, listing, text_field, tok_json, tok, val_fraction, seed, seq_len, shard_samples, token_dtype, out,
         progress):
    from tqdm import tqdm
    groups = _group_units(listing.units, ex.capacity)
    tok_ref = ex.put(tok_json)
    packers = {s: SplitPacker(s, seq_len, shard_samples) for s in SPLITS}
    totals = {k: 0 for k in ("documents", "empty_documents", "invalid_utf8_documents", "invalid_utf8_bytes",
                             "raw_bytes", "train_tokens", "val_tokens", "train_documents", "val_documents")}
    totals["unit_sha256"] = []
    records = []
    tok_handles: Dict[int, tuple] = {}
    inflight: Dict[object, tuple] = {}
    done = set()
    queue = deque()
    next_submit = next_consume = 0
    finalized = False
    lookahead = 2 * max(ex.capacity, 1) + 2
    bar = tqdm(total=listing.total_bytes, unit="B", unit_scale=True, desc="tokenize+pack", disable=not progress,
               dynamic_ncols=True)
    try:
        while True:
            while len(inflight) < max(ex.capacity, 1):
                if queue:
                    spec = queue.popleft()
                    args = (spec.split, spec.first_sample, spec.samples, seq_len, spec.stream_end,
                            [p[0] for p in spec.pieces], tok.pad_id, token_dtype)
                    inflight[ex.shard(args, [p[1] for p in spec.pieces])] = ("shard", spec)
                elif next_submit < len(groups) and next_submit < next_consume + lookahead:
                    hs = ex.tokenize(groups[next_submit], text_field, tok_ref, tok.sha256, val_fraction, seed)
                    tok_handles[next_submit] = hs
                    inflight[hs[0]] = ("tok", next_submit)
                    next_submit += 1
                else:
                    break
            if not inflight:
                break
            for h in ex.wait(list(inflight)):
                kind, x = inflight.pop(h)
                if kind == "tok":
                    done.add(x)
                    continue
                res = ex.get(h)
                records.append(_write_shard(out, x, res))
                bar.set_postfix(shards=len(records), refresh=False)
            while next_consume in done:
                meta_h, *split_h = tok_handles.pop(next_consume)
                meta = ex.get(meta_h)
                for k in ("documents", "empty_documents", "invalid_utf8_documents", "invalid_utf8_bytes",
                          "raw_bytes"):
                    totals[k] += meta[k]
                totals["unit_sha256"].extend(meta["unit_sha256"])
                for split, handle in zip(SPLITS, split_h):
                    n_tok, n_doc = meta["split_tokens"][split], meta["split_documents"][split]
                    totals[f"{split}_tokens"] += n_tok
                    totals[f"{split}_documents"] += n_doc
                    queue.extend(packers[split].add(handle, n_tok, n_doc))
                bar.update(sum(u.size for u in groups[next_consume]))
                done.discard(next_consume)
                next_consume += 1
            if next_consume == len(groups) and not finalized:
                finalized = True
                for p in packers.values():
                    queue.extend(p.finish())
    finally:
        bar.close()
    return totals, records


def _write_shard(out: Path, spec: ShardSpec, res: dict) -> dict:
    name = f"{spec.split}-{spec.index:06d}"
    sh.atomic_write(out / f"{name}.idx.npy", res["index"])
    sh.atomic_write(out / f"{name}.tar", res["tar"])
    return {"split": spec.split, "file": f"{name}.tar", "index": f"{name}.idx.npy",
            "first_sample": spec.first_sample, "samples": spec.samples, "bytes": len(res["tar"]),
            "sha256": res["sha256"], "index_bytes": len(res["index"]), "index_sha256": res["index_sha256"]}
