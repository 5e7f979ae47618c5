"""``TokenLoader``: batches from a prepared dataset in one global, resumable order.

The order is global, not per rank. Global position ``p`` (0, 1, 2, ...) is sample
``perm(seed, p // N)[p % N]`` of the split (N samples); ``perm`` is a permutation keyed by the seed
and the epoch (``loop=True``), or the identity (``loop=False``). Batch step ``k`` covers positions
``[c0 + k*B*D, c0 + (k+1)*B*D)`` (c0 = samples consumed at the start, B = micro-batch, D = DP size),
and rank ``r`` takes the ``r``-th block of B of them. The state is therefore one number, the global
samples consumed (plus seed and dataset fingerprint), and a run resumed on another DP size or micro
batch continues the same sequence, nothing repeated or skipped. Every rank reads its own samples by
offset (the shard's ``.idx.npy``), so shards of any size never make ranks uneven.

``loop=False`` makes one pass in stored order of ``ceil(N / (B*D))`` steps on every rank; positions
past N are padding rows (PAD inputs, labels -100, doc_ids 0), so every rank runs the same number
of batches and every sample is seen exactly once across ranks.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from data_pipeline.manifest import load_manifest, verify_dataset
from data_pipeline.shards import CorruptShardError, parse_record, sample_key, sha256_file

STATE_VERSION = 1
IGNORE = -100


# --------------------------------------------------------------------------------------- order
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A uniformly shuffled order of ``range(n)`` from (seed, epoch); pure integer arithmetic, so it
    is the same on every machine and numpy version. (Sort by a bijective 64-bit hash: no ties.)"""
    mask = (1 << 64) - 1
    key = _splitmix64(np.array([seed & mask], dtype=np.uint64))
    key = _splitmix64(key ^ np.array([epoch & mask], dtype=np.uint64))
    return np.argsort(_splitmix64(np.arange(n, dtype=np.uint64) + key[0]), kind="stable")


class _Order:
    """Global position -> sample index (cached per epoch)."""

    def __init__(self, n: int, seed: int, loop: bool):
        self.n, self.seed, self.loop = n, seed, loop
        self._cache: Dict[int, np.ndarray] = {}

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if not self.loop:
            return np.where(positions < self.n, positions, -1)
        epochs = positions // self.n
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            if int(e) not in self._cache:
                if len(self._cache) > 1:
                    self._cache.pop(min(self._cache))
                self._cache[int(e)] = permutation(self.n, self.seed, int(e))
            sel = epochs == e
            out[sel] = self._cache[int(e)][positions[sel] % self.n]
        return out


class _RankBatches:
    """The index arrays of one rank's batches from global position ``start`` (a torch sampler)."""

    def __init__(self, order: _Order, start: int, B: int, rank: int, size: int, stop: Optional[int]):
        self.order, self.start, self.B, self.rank, self.size, self.stop = order, start, B, rank, size, stop

    def __iter__(self) -> Iterator[np.ndarray]:
        step = self.B * self.size
        pos = self.start
        while self.stop is None or pos < self.stop:
            yield self.order(pos + self.rank * self.B + np.arange(self.B, dtype=np.int64))
            pos += step


# --------------------------------------------------------------------------------------- storage
class SampleStore:
    """Random access to the samples of one split: global index -> (tokens, cu_seqlens)."""

    def __init__(self, root: Path, split: str, manifest: dict, skip_corrupt: bool = False):
        self.root, self.split = root, split
        self.skip_corrupt = skip_corrupt
        self.skipped = 0          # in this process (a DataLoader worker counts its own; batches carry theirs)
        info = manifest["splits"][split]
        self.seq_len = manifest["seq_len"]
        self.vocab_size = manifest["vocab_size"]
        self.pad_id = manifest["special_tokens"]["pad"]
        self.shards = info["shards"]
        self.first = np.array([s["first_sample"] for s in self.shards], dtype=np.int64)
        for s in self.shards:
            for name, size in ((s["file"], s["bytes"]), (s["index"], s["index_bytes"])):
                p = root / name
                if not p.is_file():
                    raise CorruptShardError(f"shard file '{p}' listed in the manifest is missing; "
                                            f"prepare the dataset again")
                if p.stat().st_size != size:
                    raise CorruptShardError(f"shard file '{p}' has {p.stat().st_size} bytes, the manifest records "
                                            f"{size} (truncated or overwritten); prepare the dataset again")
        self._index: List[Optional[np.ndarray]] = [None] * len(self.shards)
        self._fds: Dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_fds"], st["_index"] = {}, [None] * len(self.shards)
        return st

    def _shard(self, s: int):
        if self._pid != os.getpid():           # forked into a DataLoader worker: own descriptors
            self._fds, self._pid = {}, os.getpid()
        if s not in self._fds:
            self._fds[s] = os.open(self.root / self.shards[s]["file"], os.O_RDONLY)
        if self._index[s] is None:
            path = self.root / self.shards[s]["index"]
            try:
                idx = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise CorruptShardError(f"index '{path}' is not a valid .npy ({exc}); prepare the dataset again")
            n = self.shards[s]["samples"]
            if idx.shape != (n + 1,) or idx[0] != 0 or idx[-1] > self.shards[s]["bytes"]:
                raise CorruptShardError(f"index '{path}' does not describe shard '{self.shards[s]['file']}' "
                                        f"({idx.shape[0]} offsets for {n} samples); prepare the dataset again")
            self._index[s] = idx
        return self._fds[s], self._index[s]

    def read(self, i: int):
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        fd, idx = self._shard(s)
        j = i - int(self.first[s])
        off, end = int(idx[j]), int(idx[j + 1])
        path = str(self.root / self.shards[s]["file"])
        buf = os.pread(fd, end - off, off)
        if len(buf) != end - off:
            raise CorruptShardError(f"shard '{path}' is truncated: sample {i} needs bytes {off}-{end}; "
                                    f"prepare the dataset again")
        tokens, cu = parse_record(buf, sample_key(self.split, i), path)
        T = self.seq_len
        if (tokens.shape != (T + 1,) or cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] > T + 1
                or np.any(np.diff(cu) <= 0) or int(tokens.max()) >= self.vocab_size):
            raise CorruptShardError(f"shard '{path}' is corrupt: sample {i} has tokens of shape {tokens.shape} "
                                    f"or segment bounds {cu.tolist()[:8]} outside seq_len {T} / vocab "
                                    f"{self.vocab_size}; prepare the dataset again")
        return tokens, cu

    def batch(self, indices: np.ndarray, return_indices: bool = False) -> dict:
        B, T = len(indices), self.seq_len
        tok = np.full((B, T + 1), self.pad_id, dtype=np.int64)
        seg = np.zeros((B, T + 1), dtype=np.int64)
        n_real = np.zeros(B, dtype=np.int64)
        pos = np.arange(T + 1)
        skipped = 0
        for b, i in enumerate(indices):
            if i < 0:                          # padding row of a final validation step
                continue
            try:
                t, cu = self.read(int(i))
            except CorruptShardError as exc:
                if not self.skip_corrupt:
                    raise CorruptShardError(f"{exc} (or pass --data.skip_corrupt=true to skip unreadable "
                                            f"samples)") from None
                skipped += 1
                self.skipped += 1
                print(f"warning: skipped unreadable sample {int(i)} of split '{self.split}' (a padding row, "
                      f"no loss): {exc}", file=sys.stderr, flush=True)
                continue                       # stays a padding row: labels -100
            tok[b] = t
            seg[b] = np.searchsorted(cu[1:], pos, side="right")   # segment of each position
            n_real[b] = cu[-1]
        same = (seg[:, 1:] == seg[:, :-1]) & (pos[None, 1:] < n_real[:, None])
        out = {"input_ids": torch.from_numpy(np.ascontiguousarray(tok[:, :T])),
               "labels": torch.from_numpy(np.where(same, tok[:, 1:], IGNORE)),
               "doc_ids": torch.from_numpy(np.ascontiguousarray(seg[:, :T]))}
        if return_indices:
            out["indices"] = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        if skipped:
            out["skipped"] = skipped
        return out

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style: the "index" is a whole batch of sample indices (DataLoader batch_size=None)."""

    def __init__(self, store: SampleStore, return_indices: bool):
        self.store, self.return_indices = store, return_indices

    def __getitem__(self, indices):
        return self.store.batch(indices, self.return_indices)


# --------------------------------------------------------------------------------------- loader
class TokenLoader:
    """Batches ``dict(input_ids, labels, doc_ids)`` of LongTensor[B, T] for one DP rank.

    ``labels[t]`` is the next token, or -100 where it belongs to another document or is padding;
    ``doc_ids`` numbers the documents of a row 0, 1, 2, ... (a new value = a document start; the
    padding tail is a segment of its own). Iterating consumes samples: after k batches,
    ``state_dict()['samples_consumed']`` has grown by k * B * dp_size. ``iter()`` continues from the
    current state (call ``load_state_dict`` first to resume); one active iterator at a time.
    """

    def __init__(self, dataset_dir: str, split: str, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, num_workers: int = 0, loop: bool = True, *, verify: bool = False,
                 return_indices: bool = False, prefetch_factor: int = 4, skip_corrupt: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size) with dp_size ({dp_size}) >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers ({num_workers}) must be >= 0")
        self.dataset_dir = str(dataset_dir)
        root = Path(dataset_dir)
        self.manifest = verify_dataset(dataset_dir, (split,)) if verify else load_manifest(dataset_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split '{split}' is not in {dataset_dir} (splits: {', '.join(self.manifest['splits'])})")
        tok = root / self.manifest["tokenizer"]["file"]
        if not tok.is_file() or sha256_file(tok) != self.manifest["tokenizer"]["sha256"]:
            raise ValueError(f"'{tok}' is missing or is not the tokenizer recorded in the manifest (sha256 "
                             f"{self.manifest['tokenizer']['sha256'][:16]}...); restore it or prepare the data again")
        self.split, self.seed, self.loop = split, int(seed), loop
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_workers, self.prefetch_factor, self.return_indices = num_workers, prefetch_factor, return_indices
        self.seq_len = self.manifest["seq_len"]
        self.vocab_size = self.manifest["vocab_size"]
        self.num_samples = self.manifest["splits"][split]["samples"]
        self.fingerprint = self.manifest["fingerprint"]
        if self.num_samples == 0:
            raise ValueError(f"split '{split}' of {dataset_dir} has no samples; prepare it with more documents "
                             f"or a larger --val-fraction")
        self.store = SampleStore(root, split, self.manifest, skip_corrupt=skip_corrupt)
        self._order = _Order(self.num_samples, self.seed, loop)
        self._consumed = 0
        self._generation = 0

    # ---- sizes
    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Batches per rank of one pass (loop=False); a looping loader has no length."""
        if self.loop:
            raise TypeError("a TokenLoader with loop=True is infinite; use num_samples / global_batch_size")
        return -(-self.num_samples // self.global_batch_size)

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_samples if self.loop else 0

    # ---- iteration
    def __iter__(self):
        stop = None
        if not self.loop:
            stop = len(self) * self.global_batch_size
            if self._consumed >= stop:          # previous pass finished: a new pass
                self._consumed = 0
        return self._batches(self._consumed, stop, self._generation)

    def _batches(self, start: int, stop: Optional[int], generation: int):
        plan = _RankBatches(self._order, start, self.micro_batch_size, self.dp_rank, self.dp_size, stop)
        if self.num_workers == 0:
            source = (self.store.batch(ix, self.return_indices) for ix in plan)
        else:
            source = iter(torch.utils.data.DataLoader(
                _BatchDataset(self.store, self.return_indices), batch_size=None, sampler=plan,
                num_workers=self.num_workers, prefetch_factor=self.prefetch_factor, persistent_workers=False))
        for batch in source:
            if generation != self._generation:
                raise RuntimeError("load_state_dict was called during iteration; call iter() on the loader again")
            self._consumed += self.global_batch_size
            yield batch

    # ---- state
    def state_dict(self) -> dict:
        return {"samples_consumed": self._consumed, "epoch": self.epoch, "seed": self.seed,
                "fingerprint": self.fingerprint, "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
                "split": self.split, "num_samples": self.num_samples, "loop": self.loop,
                "version": STATE_VERSION}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("samples_consumed", "seed", "fingerprint") if k not in state]
        if missing:
            raise ValueError(f"data-loader state lacks {', '.join(missing)}; pass a dict from TokenLoader.state_dict()")
        if state["fingerprint"] != self.fingerprint:
            tok_then, tok_now = state.get("tokenizer_sha256"), self.manifest["tokenizer"]["sha256"]
            detail = (f"; the tokenizer differs too (sha256 {tok_then[:16]}... then, {tok_now[:16]}... now)"
                      if tok_then and tok_then != tok_now else "")
            raise ValueError(f"the data-loader state was saved on dataset fingerprint {state['fingerprint']}, but "
                             f"{self.dataset_dir} has fingerprint {self.fingerprint}{detail}; resume with the "
                             f"dataset the run started on, or start a new run")
        if state.get("split", self.split) != self.split:
            raise ValueError(f"the state is for split '{state['split']}', this loader reads '{self.split}'")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the state was saved with seed {state['seed']}, this loader has seed {self.seed}; "
                             f"construct the loader with seed={state['seed']} to continue the same order")
        if int(state["samples_consumed"]) < 0:
            raise ValueError(f"samples_consumed ({state['samples_consumed']}) must be >= 0")
        self._consumed = int(state["samples_consumed"])
        self._generation += 1
