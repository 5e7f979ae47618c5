"""Built-in byte-level corpus: no preparation step, no tokenizer training.

Used when ``data.dataset`` is empty (tests, quick runs). Documents are the ``.py`` files of the
running interpreter's standard library (docs/DATA.md, "Sources") or the ``.txt``/``.py`` files of a directory,
in sorted path order; a document goes to validation when the md5 of its relative path falls below
``val_fraction``. Each document becomes ``[BOS] bytes [EOS]``; documents are concatenated and cut
into windows of ``seq_len + 1`` tokens (the tail that does not fill a window is dropped and counted).
Sampling order is a permutation of windows from ``(seed, epoch)``.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterator, List

import numpy as np
import torch

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def list_documents(source: str) -> List[Path]:
    if source in ("", "default"):
        return stdlib_files()
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"data.source '{source}' is not a directory; use 'default' for the stdlib "
                                f"corpus or a directory of .txt files")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".py") and p.is_file())
    if not files:
        raise ValueError(f"data.source '{source}' holds no .txt or .py files")
    return files


def is_validation(rel_path: str, fraction: float) -> bool:
    h = int(hashlib.md5(rel_path.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


class ByteCorpus:
    def __init__(self, source: str, split: str, seq_len: int, val_fraction: float, max_documents: int = 0):
        files = list_documents(source)
        root = Path(sysconfig.get_paths()["stdlib"]) if source in ("", "default") else Path(source)
        if max_documents:
            files = files[:max_documents]
        chunks, docs = [], []
        n_docs = 0
        for f in files:
            if is_validation(str(f.relative_to(root)), val_fraction) != (split == "val"):
                continue
            data = np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.int16)
            if data.size == 0:
                continue
            chunks.append(np.concatenate([[BOS], data, [EOS]]).astype(np.int16))
            docs.append(np.full(data.size + 2, n_docs, dtype=np.int32))
            n_docs += 1
        if not chunks:
            raise ValueError(f"the {split} split of '{source}' is empty (val_fraction={val_fraction}, "
                             f"{len(files)} files); use more documents or another val_fraction")
        self.tokens = torch.from_numpy(np.concatenate(chunks).astype(np.int64))
        self.docs = torch.from_numpy(np.concatenate(docs).astype(np.int64))
        self.seq_len = seq_len
        self.num_windows = (self.tokens.numel() - 1) // (seq_len + 1)
        if self.num_windows == 0:
            raise ValueError(f"the {split} split has {self.tokens.numel()} tokens, fewer than one sequence "
                             f"of {seq_len + 1}; lower data.seq_len or add documents")
        self.dropped_tokens = self.tokens.numel() - self.num_windows * (seq_len + 1)
        self.num_documents = n_docs
        self.vocab_size = VOCAB_SIZE

    def window(self, i: int):
        s = i * (self.seq_len + 1)
        tok, doc = self.tokens[s:s + self.seq_len + 1], self.docs[s:s + self.seq_len + 1]
        labels = torch.where(doc[1:] == doc[:-1], tok[1:], torch.full_like(tok[1:], -100))
        return tok[:-1], labels, doc[:-1] - doc[0]

    def batches(self, batch_size: int, seed: int, start_sample: int = 0, loop: bool = True) -> Iterator[dict]:
        """Deterministic batches; ``start_sample`` skips what an earlier run consumed."""
        n = self.num_windows
        orders = {}

        def order(epoch):
            if epoch not in orders:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                orders.clear()
                orders[epoch] = torch.randperm(n, generator=g) if loop else torch.arange(n)
            return orders[epoch]

        sample = start_sample
        while True:
            if not loop and sample + batch_size > n:
                return
            rows = []
            for j in range(batch_size):
                epoch, pos = divmod(sample + j, n)
                rows.append(self.window(int(order(epoch)[pos])))
            sample += batch_size
            yield {"input_ids": torch.stack([r[0] for r in rows]),
                   "labels": torch.stack([r[1] for r in rows]),
                   "doc_ids": torch.stack([r[2] for r in rows]),
                   "samples_consumed": sample}
