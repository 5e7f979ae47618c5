"""The packing rule on hand-checked cases, and the fast tar/npy writers against the standard ones."""
import io
import tarfile

import numpy as np

from data_pipeline.shards import _member, _npy_bytes, _tar_header, build_shard, num_samples, pack_windows


def windows(doc_lens, T, pad=0):
    toks = np.concatenate([np.full(n, 10 + d, dtype=np.uint32) for d, n in enumerate(doc_lens)])
    starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
    L = len(toks)
    return pack_windows(toks, starts, 0, num_samples(L, T), T, L, pad)


def test_pack_windows_by_hand():
    w = windows([3, 6, 2], T=4)                       # stream of 11 tokens: docs at 0, 3, 9
    assert len(w) == 3
    assert w[0][0].tolist() == [10, 10, 10, 11, 11] and w[0][1].tolist() == [0, 3, 5]
    assert w[1][0].tolist() == [11, 11, 11, 11, 11] and w[1][1].tolist() == [0, 5]
    assert w[2][0].tolist() == [11, 12, 12, 0, 0] and w[2][1].tolist() == [0, 1, 3]


def test_pack_windows_edges():
    w = windows([4, 4], T=4)                          # L = 8 = 2 T: the last label slot is padding
    assert len(w) == 2 and w[0][1].tolist() == [0, 4, 5] and w[1][1].tolist() == [0, 4]
    w = windows([5, 4], T=4)                          # L = 9 = 2 T + 1: a third sample holds one input
    assert len(w) == 3 and w[2][0].tolist() == [11, 0, 0, 0, 0] and w[2][1].tolist() == [0, 1]
    w = windows([2, 2, 2, 2], T=3)                    # a document starts exactly at a window start
    assert [x[1].tolist() for x in w] == [[0, 2, 4], [0, 1, 3, 4], [0, 2]]
    assert sum(min(int(cu[-1]), 3) for _, cu in w) == 8     # every token is an input exactly once


def test_writers_match_tarfile_and_numpy():
    for name, size in [("train-000000001.tokens.npy", 642), ("val-123456789.cu_seqlens.npy", 0), ("é" * 10, 7)]:
        assert _member(name, b"a" * size)[:512] == _tar_header(name, size)
    for a in [np.arange(257, dtype=np.uint16), np.array([0, 5, 9], dtype=np.int32), np.zeros(0, np.int32),
              np.arange(9, dtype=np.uint32)]:
        buf = io.BytesIO()
        np.save(buf, a)
        assert _npy_bytes(a) == buf.getvalue()


def test_build_shard_is_a_valid_tar_with_offsets():
    samples = windows([3, 6, 2, 7], T=4)
    tar, index = build_shard("train", 5, samples, "uint16")
    offsets = np.load(io.BytesIO(index))
    assert len(tar) % 10240 == 0 and offsets[0] == 0 and len(offsets) == len(samples) + 1
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members[:2]] == ["train-000000005.tokens.npy", "train-000000005.cu_seqlens.npy"]
        assert [m.offset for m in members[::2]] == offsets[:-1].tolist()
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
        got = np.load(io.BytesIO(tf.extractfile(members[2]).read()))
        assert got.dtype == np.uint16 and got.tolist() == samples[1][0].tolist()
