"""The two Ray task bodies of ``prepare_dataset`` and the packing plan that links them.

``tokenize_group`` reads, decodes, splits and tokenizes a group of units; ``pack_shard`` turns the
stretch of a split's stream that one shard covers into tar + index bytes. ``SplitPacker`` (driver
side) appends group results to a split's stream in document order and says when a shard is covered.
These functions run the same way in a Ray worker and in-process (``workers=0``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from data_pipeline import shards as sh
from data_pipeline.sources import Unit, is_validation, read_unit
from data_pipeline.tokenizer import TextTokenizer

SPLITS = ("train", "val")


_TOKENIZERS: Dict[str, TextTokenizer] = {}


def _tokenizer(tok_json: str, sha: str) -> TextTokenizer:
    if sha not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[sha] = TextTokenizer(tok_json, sha)
    return _TOKENIZERS[sha]


def tokenize_group(units: List[Unit], text_field: str, tok_json: str, tok_sha: str, val_fraction: float,
                   seed: int):
    """Read and tokenize a group of units. Returns ``(meta, train, val)``; ``train``/``val`` hold
    ``tokens`` (uint32, every document as [BOS] ids [EOS], concatenated) and ``doc_lens``."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one task = one core; Ray runs tasks side by side
    tok = _tokenizer(tok_json, tok_sha)
    texts = {s: [] for s in SPLITS}
    meta = {"documents": 0, "empty_documents": 0, "invalid_utf8_documents": 0, "invalid_utf8_bytes": 0,
            "raw_bytes": 0, "unit_sha256": []}
    for unit in units:
        h = hashlib.sha256()
        for doc in read_unit(unit, text_field):
            meta["documents"] += 1
            meta["raw_bytes"] += doc.raw_bytes
            h.update(len(doc.data).to_bytes(8, "little"))
            h.update(doc.data)
            if doc.invalid_bytes:
                meta["invalid_utf8_documents"] += 1
                meta["invalid_utf8_bytes"] += doc.invalid_bytes
            if not doc.data:
                meta["empty_documents"] += 1
                continue
            split = "val" if is_validation(doc.data, val_fraction, seed) else "train"
            texts[split].append(doc.text)
        meta["unit_sha256"].append(h.hexdigest())
    out = []
    for split in SPLITS:
        ids = tok.encode_batch(texts[split]) if texts[split] else []
        lens = np.fromiter((len(x) + 2 for x in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lens.sum()), dtype=np.uint32)
        pos = 0
        for x in ids:
            tokens[pos] = tok.bos_id
            tokens[pos + 1: pos + 1 + len(x)] = x
            tokens[pos + 1 + len(x)] = tok.eos_id
            pos += len(x) + 2
        out.append({"tokens": tokens, "doc_lens": lens})
    meta["split_tokens"] = {s: len(o["tokens"]) for s, o in zip(SPLITS, out)}
    meta["split_documents"] = {s: len(o["doc_lens"]) for s, o in zip(SPLITS, out)}
    return meta, out[0], out[1]


def pack_shard(split: str, first_sample: int, n: int, seq_len: int, stream_end: int, offsets: List[int],
               pad_id: int, token_dtype: str, *pieces) -> dict:
    """Pack samples ``first_sample ..+n`` of a split from the group arrays that cover them."""
    a = first_sample * seq_len
    b = min((first_sample + n) * seq_len + 1, stream_end)
    toks, starts = [], []
    for off, piece in zip(offsets, pieces):
        lo, hi = max(a, off), min(b, off + len(piece["tokens"]))
        toks.append(piece["tokens"][lo - off: hi - off])
        st = off + np.concatenate([[0], np.cumsum(piece["doc_lens"])[:-1]])
        starts.append(st[(st >= a) & (st < b)])
    tokens = np.concatenate(toks)
    assert len(tokens) == b - a, (len(tokens), a, b)
    samples = sh.pack_windows(tokens, np.concatenate(starts), first_sample, n, seq_len, stream_end, pad_id)
    tar, index = sh.build_shard(split, first_sample, samples, token_dtype)
    return {"tar": tar, "index": index, "sha256": hashlib.sha256(tar).hexdigest(),
            "index_sha256": hashlib.sha256(index).hexdigest()}


# --------------------------------------------------------------------------------------- packing plan
@dataclass
class ShardSpec:
    split: str
    index: int
    first_sample: int
    samples: int
    stream_end: int                      # the split's stream length known so far (>= the shard's end)
    pieces: List[Tuple[int, object]]     # (stream offset, handle of the group's split arrays)


class SplitPacker:
    """Tracks one split's stream and says when a shard's samples are fully covered."""

    def __init__(self, split: str, seq_len: int, shard_samples: int):
        self.split, self.T, self.S = split, seq_len, shard_samples
        self.pieces: List[Tuple[int, int, object]] = []
        self.length = 0
        self.documents = 0
        self.next_shard = 0

    def add(self, handle, n_tokens: int, n_docs: int) -> List[ShardSpec]:
        if n_tokens:
            self.pieces.append((self.length, n_tokens, handle))
            self.length += n_tokens
            self.documents += n_docs
        return self._ready(final=False)

    def finish(self) -> List[ShardSpec]:
        return self._ready(final=True)

    def _ready(self, final: bool) -> List[ShardSpec]:
        specs = []
        while True:
            first = self.next_shard * self.S
            if final:
                n = min(self.S, sh.num_samples(self.length, self.T) - first)
                if n <= 0:
                    break
            elif self.length >= (first + self.S) * self.T + 1:   # + 1: the last sample's label token
                n = self.S
            else:
                break
            a, b = first * self.T, min((first + n) * self.T + 1, self.length)
            pieces = [(off, h) for off, nt, h in self.pieces if off < b and off + nt > a]
            specs.append(ShardSpec(self.split, self.next_shard, first, n, self.length, pieces))
            self.next_shard += 1
            keep_from = self.next_shard * self.S * self.T
            self.pieces = [p for p in self.pieces if p[0] + p[1] > keep_from]
        return specs
