"""TokenLoader: batch semantics, global order, DP slices, validation pass, workers, state, corrupt data."""
import itertools
import shutil

import numpy as np
import pytest
import torch

from data_pipeline import TokenLoader, prepare_dataset, verify_dataset
from data_pipeline.loader import permutation
from data_pipeline.manifest import ManifestError
from data_pipeline.shards import CorruptShardError
from dp_corpus import write_text_corpus

OPTS = dict(vocab_size=400, seq_len=32, val_fraction=0.2, shard_samples=7, workers=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    corpus = write_text_corpus(root / "corpus", n_docs=40, max_words=150)
    a = prepare_dataset(str(corpus), str(root / "a"), **OPTS)
    prepare_dataset(str(corpus), str(root / "b"), **{**OPTS, "seq_len": 48})
    prepare_dataset(str(corpus), str(root / "c"), **{**OPTS, "vocab_size": 350})
    return {"a": str(root / "a"), "b": str(root / "b"), "c": str(root / "c"), "manifest": a}


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batch_semantics(data):
    m = data["manifest"]
    bos, pad = m["special_tokens"]["bos"], m["special_tokens"]["pad"]
    loader = TokenLoader(data["a"], "train", 4, seed=1)
    assert (loader.seq_len, loader.vocab_size, loader.num_samples) == (32, 400, m["splits"]["train"]["samples"])
    n_starts = 0
    for b in take(loader, 30):
        x, y, d = b["input_ids"], b["labels"], b["doc_ids"]
        assert x.shape == y.shape == d.shape == (4, 32) and x.dtype == y.dtype == d.dtype == torch.int64
        assert (d[:, 0] == 0).all() and ((d[:, 1:] - d[:, :-1]) >= 0).all() and ((d[:, 1:] - d[:, :-1]) <= 1).all()
        same = d[:, 1:] == d[:, :-1]
        assert torch.equal(y[:, :-1][same & (x[:, 1:] != pad)], x[:, 1:][same & (x[:, 1:] != pad)])
        assert (y[:, :-1][~same] == -100).all()
        starts = torch.nonzero(~same)
        real_starts = [(r, t) for r, t in starts.tolist() if x[r, t + 1] != pad]
        assert all(x[r, t + 1] == bos for r, t in real_starts)       # a new doc id = a document's BOS
        n_starts += len(real_starts)
        assert not (y == bos).any()                                   # BOS is never a label
    assert n_starts > 10
    last = loader.store.batch(np.array([loader.num_samples - 1]))      # the padded tail of the split
    x, y, d = last["input_ids"][0], last["labels"][0], last["doc_ids"][0]
    n_pad = m["splits"]["train"]["padding_tokens"]
    assert n_pad > 0 and (x[32 - n_pad:] == pad).all() and (y[32 - n_pad - 1:] == -100).all()
    assert d[32 - n_pad] == d[32 - n_pad - 1] + 1                      # padding is a segment of its own


def test_global_order_is_a_fresh_permutation_per_epoch(data):
    loader = TokenLoader(data["a"], "train", 5, seed=7, return_indices=True)
    N = loader.num_samples
    seq = torch.cat([b["indices"] for b in take(loader, (3 * N) // 5 + 1)]).tolist()
    epochs = [seq[e * N:(e + 1) * N] for e in range(3)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(N))
    assert epochs[1] == permutation(N, 7, 1).tolist()
    assert loader.state_dict()["epoch"] == len(seq) // N
    again = torch.cat([b["indices"] for b in take(TokenLoader(data["a"], "train", 5, seed=7, return_indices=True),
                                                   N // 5)]).tolist()
    assert again == seq[:len(again)]
    other = torch.cat([b["indices"] for b in take(TokenLoader(data["a"], "train", 5, seed=8, return_indices=True),
                                                   N // 5)]).tolist()
    assert other != seq[:len(other)]


def test_dp_ranks_partition_the_global_batch(data):
    single = take(TokenLoader(data["a"], "train", 6, seed=2, return_indices=True), 12)
    ranks = [take(TokenLoader(data["a"], "train", 2, r, 3, seed=2, return_indices=True), 12) for r in range(3)]
    for k in range(12):
        for key in ("indices", "input_ids", "labels", "doc_ids"):
            assert torch.equal(torch.cat([ranks[r][k][key] for r in range(3)]), single[k][key])


def test_validation_pass_is_exact_and_even(data):
    N = data["manifest"]["splits"]["val"]["samples"]
    assert N % 8 != 0
    loaders = [TokenLoader(data["a"], "val", 4, r, 2, loop=False, return_indices=True) for r in range(2)]
    passes = [list(l) for l in loaders]
    assert len(passes[0]) == len(passes[1]) == len(loaders[0]) == -(-N // 8)
    idx = torch.cat([torch.cat([passes[r][k]["indices"] for r in range(2)]) for k in range(len(passes[0]))])
    assert idx[idx >= 0].tolist() == list(range(N)) and (idx[N:] == -1).all()
    for p in passes:
        for b in p:
            pad_rows = b["indices"] < 0
            assert (b["labels"][pad_rows] == -100).all() and (b["doc_ids"][pad_rows] == 0).all()
    assert loaders[0].state_dict()["samples_consumed"] == len(passes[0]) * 8
    second = list(loaders[0])                                          # a new pass starts over
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(second, passes[0]))


def test_worker_processes_give_the_same_batches_and_state(data):
    plain = TokenLoader(data["a"], "train", 3, 1, 2, seed=4)
    workers = TokenLoader(data["a"], "train", 3, 1, 2, seed=4, num_workers=2)
    it_p, it_w = iter(plain), iter(workers)
    for k in range(1, 26):
        a, b = next(it_p), next(it_w)
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert workers.state_dict()["samples_consumed"] == plain.state_dict()["samples_consumed"] == k * 6


def test_resume_on_another_layout_continues_the_sequence(data):
    ref = torch.cat([b["indices"] for b in take(TokenLoader(data["a"], "train", 4, seed=9, return_indices=True),
                                                 40)]).tolist()
    first = TokenLoader(data["a"], "train", 4, seed=9, return_indices=True)
    got = torch.cat([b["indices"] for b in take(first, 7)]).tolist()
    state = first.state_dict()
    assert state["samples_consumed"] == 28
    ranks = [TokenLoader(data["a"], "train", 3, r, 2, seed=9, return_indices=True) for r in range(2)]
    for l in ranks:
        l.load_state_dict(state)
    batches = [take(l, 11) for l in ranks]
    for k in range(11):
        got += batches[0][k]["indices"].tolist() + batches[1][k]["indices"].tolist()
    assert got == ref[:len(got)] and len(got) == 28 + 66
    assert ranks[0].state_dict() == ranks[1].state_dict() and ranks[0].state_dict()["samples_consumed"] == 94


def test_state_mismatches_are_errors(data):
    a = TokenLoader(data["a"], "train", 2, seed=1)
    take(a, 3)
    state = a.state_dict()
    with pytest.raises(ValueError) as e:
        TokenLoader(data["b"], "train", 2, seed=1).load_state_dict(state)
    fp_b = TokenLoader(data["b"], "train", 2).fingerprint
    assert state["fingerprint"] in str(e.value) and fp_b in str(e.value) and "tokenizer" not in str(e.value)
    with pytest.raises(ValueError, match="the tokenizer differs too"):
        TokenLoader(data["c"], "train", 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 1, this loader has seed 2"):
        TokenLoader(data["a"], "train", 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="split 'train'"):
        TokenLoader(data["a"], "val", 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks fingerprint"):
        a.load_state_dict({"samples_consumed": 1, "seed": 1})
    b = TokenLoader(data["a"], "train", 2, seed=1)
    b.load_state_dict(state)
    assert b.state_dict() == state


def test_load_state_during_iteration_is_refused(data):
    a = TokenLoader(data["a"], "train", 2)
    it = iter(a)
    next(it)
    a.load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="call iter"):
        next(it)


def copy_dataset(data, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(data["a"], d)
    return d


def test_truncated_shard_is_named(data, tmp_path):
    d = copy_dataset(data, tmp_path)
    p = d / "train-000001.tar"
    p.write_bytes(p.read_bytes()[:1500])
    with pytest.raises(CorruptShardError, match=r"train-000001\.tar' has 1500 bytes.*truncated"):
        TokenLoader(str(d), "train", 2)
    TokenLoader(str(d), "val", 2)                                      # the other split is unaffected


def test_corrupt_shard_bytes_are_named(data, tmp_path):
    d = copy_dataset(data, tmp_path)
    p = d / "train-000000.tar"
    idx = np.load(d / "train-000000.idx.npy")
    raw = bytearray(p.read_bytes())
    raw[idx[3]:idx[3] + 40] = b"\x07" * 40                             # sample 3's tar header
    p.write_bytes(bytes(raw))
    loader = TokenLoader(str(d), "train", 1, loop=False)
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar' is corrupt: bad tar header"):
        list(loader)
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar' fails its sha256"):
        verify_dataset(str(d))


def test_silent_bit_flip_is_caught_by_checksum(data, tmp_path):
    d = copy_dataset(data, tmp_path)
    p = d / "train-000001.tar"
    idx = np.load(d / "train-000001.idx.npy")
    raw = bytearray(p.read_bytes())
    pos = int(idx[2]) + 512 + 128 + 10                                 # a token of sample 2, still a valid id
    raw[pos] ^= 0x01
    p.write_bytes(bytes(raw))
    TokenLoader(str(d), "train", 2)                                    # size checks alone cannot see it
    with pytest.raises(CorruptShardError, match=r"train-000001\.tar' fails its sha256"):
        TokenLoader(str(d), "train", 2, verify=True)
    raw[pos + 1] = 0xFF                                                # token id >= vocab: caught on read
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=r"train-000001\.tar' is corrupt: sample"):
        list(TokenLoader(str(d), "train", 1, loop=False))


def test_missing_or_edited_files(data, tmp_path):
    d = copy_dataset(data, tmp_path)
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace('"<|eos|>"', '"<|EOS|>"'))
    with pytest.raises(ValueError, match="not the tokenizer recorded"):
        TokenLoader(str(d), "train", 2)
    shutil.copy(f"{data['a']}/tokenizer.json", d / "tokenizer.json")
    man = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(man.replace('"seq_len": 32', '"seq_len": 33'))
    with pytest.raises(ManifestError, match="modified after it was written"):
        TokenLoader(str(d), "train", 2)
    (d / "manifest.json").write_text(man)
    (d / "val-000000.idx.npy").unlink()
    with pytest.raises(CorruptShardError, match=r"val-000000\.idx\.npy' listed in the manifest is missing"):
        TokenLoader(str(d), "val", 2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenLoader(str(tmp_path / "none"), "train", 2)


def test_bad_arguments(data):
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, dp_size\)"):
        TokenLoader(data["a"], "train", 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        TokenLoader(data["a"], "train", 0)
    with pytest.raises(ValueError, match="split 'test' is not in"):
        TokenLoader(data["a"], "test", 2)
    with pytest.raises(TypeError, match="infinite"):
        len(TokenLoader(data["a"], "train", 2))
