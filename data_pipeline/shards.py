"""Packed samples, their WebDataset tar shards, and the per-shard offset index.

Packing rule (documented in docs/DATA.md). Per split, every document becomes ``[BOS] tokens [EOS]``
and the documents are concatenated in document order into one stream of ``L`` tokens. Sample ``i``
is the window ``stream[i*T : i*T + T + 1]`` (T = seq_len): its first T tokens are the inputs, the
extra token is the label of the last input. Consecutive windows overlap by that one token, so every
stream token is an input exactly once and every token after the first is a label candidate exactly
once. The last window is right-padded with PAD; there are ``ceil(L / T)`` samples and nothing is
dropped. A document that does not fit the rest of a window continues at the start of the next one.

A sample is two tar members, readable by ``tar`` and ``webdataset``:
- ``<key>.tokens.npy``: the T + 1 token ids (uint16 when the vocabulary fits, else uint32);
- ``<key>.cu_seqlens.npy``: int32 ``[0, e_1, ..., e_k]``, the ends of the document segments inside the
  window (flash-attn style cumulative lengths); the last entry is the number of real tokens, the
  positions after it are padding. A new document starts at every inner entry.
``key`` is ``<split>-<global sample index, 9 digits>``. Tar headers are fixed (mtime 0, uid 0, mode
0644), so the bytes depend only on the samples. ``<shard>.idx.npy`` holds the int64 byte offsets of
each sample's first header (plus the end), which gives the loader random access.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK      # tar's default blocking factor, as tarfile and GNU tar write it


class CorruptShardError(ValueError):
    """A shard whose bytes do not match what the manifest and index promise."""


# --------------------------------------------------------------------------------------- packing
def num_samples(stream_tokens: int, seq_len: int) -> int:
    return -(-stream_tokens // seq_len)


def pack_windows(tokens: np.ndarray, doc_starts: np.ndarray, first_sample: int, n: int, seq_len: int,
                 stream_end: int, pad_id: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The samples ``first_sample .. first_sample + n - 1``.

    ``tokens`` holds the stream from position ``first_sample * seq_len`` on (at least up to the last
    window's end or ``stream_end``); ``doc_starts`` are the absolute stream positions of document
    starts in that range; ``stream_end`` is L, the length of the whole stream.
    """
    base = first_sample * seq_len
    out = []
    for j in range(n):
        a = base + j * seq_len
        b = min(a + seq_len + 1, stream_end)
        win = np.full(seq_len + 1, pad_id, dtype=np.uint32)
        win[: b - a] = tokens[a - base: b - base]
        lo, hi = np.searchsorted(doc_starts, [a + 1, b])
        cu = np.concatenate([[0], doc_starts[lo:hi] - a, [b - a]]).astype(np.int32)
        out.append((win, cu))
    return out


# --------------------------------------------------------------------------------------- tar
_NPY_HEADERS = {}


def _npy_bytes(arr: np.ndarray) -> bytes:
    """Exactly what ``np.save`` writes, with the header cached per (dtype, shape): packing writes two
    small arrays per sample and the header would otherwise cost more than the data."""
    key = (arr.dtype.str, arr.shape)
    if key not in _NPY_HEADERS:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        _NPY_HEADERS[key] = buf.getvalue()[:-arr.nbytes or None]
    return _NPY_HEADERS[key] + np.ascontiguousarray(arr).tobytes()


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_HEADER_TEMPLATE = bytearray(_tar_header("", 0))
_HEADER_TEMPLATE[148:156] = b" " * 8


def _member(name: str, data: bytes) -> bytes:
    """One ustar member; the header is ``tarfile``'s (mtime 0, uid/gid 0, mode 0644), patched from a
    template for speed (tested equal to ``tarfile.TarInfo.tobuf``)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        return _tar_header(name, len(data)) + data + b"\0" * ((-len(data)) % BLOCK)
    hdr = bytearray(_HEADER_TEMPLATE)
    hdr[0:len(raw)] = raw
    hdr[124:136] = b"%011o\0" % len(data)
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr) + data + b"\0" * ((-len(data)) % BLOCK)


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:09d}"


def build_shard(split: str, first_index: int, samples: Sequence[Tuple[np.ndarray, np.ndarray]],
                token_dtype: str) -> Tuple[bytes, bytes]:
    """``(tar bytes, index .npy bytes)`` for consecutive samples starting at global ``first_index``."""
    parts, offsets, pos = [], [], 0
    for j, (tokens, cu) in enumerate(samples):
        key = sample_key(split, first_index + j)
        rec = (_member(f"{key}.tokens.npy", _npy_bytes(tokens.astype(token_dtype)))
               + _member(f"{key}.cu_seqlens.npy", _npy_bytes(cu.astype(np.int32))))
        offsets.append(pos)
        parts.append(rec)
        pos += len(rec)
    offsets.append(pos)
    end = pos + 2 * BLOCK
    parts.append(b"\0" * (2 * BLOCK + (-end) % RECORD))
    return b"".join(parts), _npy_bytes(np.asarray(offsets, dtype=np.int64))


# --------------------------------------------------------------------------------------- files
def atomic_write(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name in the same directory, fsync, then rename: a reader sees
    either nothing or the whole file, whatever happens to this process."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


# --------------------------------------------------------------------------------------- reading
_NPY_READ: dict = {}      # npy header bytes -> (dtype, shape, header length)


def _corrupt(shard: str, what: str) -> CorruptShardError:
    return CorruptShardError(f"shard '{shard}' is corrupt: {what}; prepare the dataset again")


def _read_npy(buf: memoryview, shard: str, name: str) -> np.ndarray:
    """``np.load`` for the arrays we wrote, with the header parse cached (it is most of the cost)."""
    if len(buf) < 10 or bytes(buf[:6]) != b"\x93NUMPY" or buf[6] != 1:
        raise _corrupt(shard, f"member '{name}' is not a version 1 .npy")
    hlen = 10 + int.from_bytes(buf[8:10], "little")
    key = bytes(buf[:hlen])
    if key not in _NPY_READ:
        try:
            f = io.BytesIO(key)
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        except ValueError as exc:
            raise _corrupt(shard, f"member '{name}' has a bad .npy header ({exc})") from exc
        if fortran or dtype.hasobject:
            raise _corrupt(shard, f"member '{name}' is not a plain C-order array")
        _NPY_READ[key] = (dtype, shape, hlen)
    dtype, shape, hlen = _NPY_READ[key]
    count = int(np.prod(shape))
    if len(buf) - hlen != count * dtype.itemsize:
        raise _corrupt(shard, f"member '{name}' holds {len(buf) - hlen} data bytes for shape {shape}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=hlen).reshape(shape)


def _read_header(hdr: bytes, shard: str, want: str):
    """(name, size) of a ustar header, checksum verified (what ``tarfile`` checks, without its cost)."""
    try:
        stored = int(hdr[148:156].strip(b"\0 ") or b"-1", 8)
        size = int(hdr[124:136].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        stored = size = -1
    if len(hdr) < BLOCK or stored != sum(hdr[:148]) + 256 + sum(hdr[156:BLOCK]) or size < 0:
        raise _corrupt(shard, f"bad tar header for '{want}'")
    return hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), size


def parse_record(buf: bytes, key: str, shard: str) -> Tuple[np.ndarray, np.ndarray]:
    """The (tokens, cu_seqlens) of one sample record; CorruptShardError names the shard otherwise."""
    mv = memoryview(buf)
    out = []
    pos = 0
    for suffix in ("tokens.npy", "cu_seqlens.npy"):
        want = f"{key}.{suffix}"
        name, size = _read_header(bytes(mv[pos:pos + BLOCK]), shard, want)
        if name != want or pos + BLOCK + size > len(mv):
            raise _corrupt(shard, f"expected member '{want}', found '{name}' ({size} bytes)")
        out.append(_read_npy(mv[pos + BLOCK: pos + BLOCK + size], shard, want))
        pos += BLOCK + size + (-size) % BLOCK
    return out[0], out[1]
