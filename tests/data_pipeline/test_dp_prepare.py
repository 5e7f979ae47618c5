"""prepare_dataset on a real local Ray cluster: packing rule, counts, byte identity, shard format, bad input."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import TokenLoader, load_tokenizer, prepare_dataset, verify_dataset
from data_pipeline import prepare as prep
from data_pipeline.manifest import ManifestError
from data_pipeline.sources import SourceError, is_validation
from dp_corpus import corpus_documents, read_tar_samples, write_mixed_corpus, write_text_corpus

REPO = Path(__file__).resolve().parents[2]
OPTS = dict(vocab_size=400, seq_len=32, val_fraction=0.2, seed=3, shard_samples=16, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("prep") / "corpus", n_docs=60)


@pytest.fixture(scope="module")
def prepared(ray_cluster, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "w2"
    m = prepare_dataset(str(corpus), str(out), workers=2, **OPTS)
    return out, m


def dataset_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "report.json"}


def expected_streams(source, tok, val_fraction, seed, text_field="text"):
    streams, docs = {"train": [], "val": []}, {"train": [], "val": []}
    for text in corpus_documents(source, text_field):
        if not text:
            continue
        split = "val" if is_validation(text.encode(), val_fraction, seed) else "train"
        streams[split] += [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        docs[split].append(text)
    return streams, docs


def test_packing_rule_and_counts_add_up(prepared, corpus):
    out, m = prepared
    T = m["seq_len"]
    tok = load_tokenizer(str(out))
    streams, docs = expected_streams(str(corpus), tok, OPTS["val_fraction"], OPTS["seed"])
    assert m["documents"]["documents"] == 63 and m["documents"]["empty_documents"] == 1
    for split in ("train", "val"):
        info = m["splits"][split]
        L = len(streams[split])
        assert info["documents"] == len(docs[split]) > 0
        assert info["tokens"] == L and info["samples"] == -(-L // T)
        assert info["padding_tokens"] == info["samples"] * T - L
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
        samples = [s for sh in info["shards"] for s in read_tar_samples(out / sh["file"])]
        assert [k for k, _, _ in samples] == [f"{split}-{i:09d}" for i in range(info["samples"])]
        rebuilt = []
        for i, (_, t, cu) in enumerate(samples):
            assert t.dtype == np.uint16 and t.shape == (T + 1,) and cu[0] == 0
            real = int(cu[-1])
            assert np.all(t[real:] == tok.pad_id)
            bos = [p for p in range(real) if t[p] == tok.bos_id and p > 0]
            assert cu[1:-1].tolist() == bos                    # every inner bound is a document start
            if real == T + 1:                                  # the label token is the next sample's first input
                assert t[T] == samples[i + 1][1][0]
            rebuilt += t[:min(real, T)].tolist()
        assert rebuilt == streams[split]                       # nothing dropped, nothing reordered
        pieces = tok.decode(rebuilt, skip_special_tokens=False)
        assert [tok.decode(tok.encode(d)) for d in docs[split]] == docs[split]
        assert pieces.count("<|bos|>") - pieces.count("text with <|bos|>") == len(docs[split])
        labels = sum(int((b["labels"] != -100).sum()) for b in TokenLoader(str(out), split, 5, loop=False))
        assert labels == info["label_tokens"] == L - len(docs[split])


def test_one_and_two_workers_and_inline_are_byte_identical(prepared, corpus, tmp_path):
    out2, m2 = prepared
    m1 = prepare_dataset(str(corpus), str(tmp_path / "w1"), workers=1, **OPTS)
    m0 = prepare_dataset(str(corpus), str(tmp_path / "w0"), workers=0, **OPTS)
    ref = dataset_files(out2)
    assert len([n for n in ref if n.endswith(".tar")]) > 5
    assert dataset_files(tmp_path / "w1") == ref
    assert dataset_files(tmp_path / "w0") == ref
    assert m0["fingerprint"] == m1["fingerprint"] == m2["fingerprint"]
    assert m1["report"]["workers"] == 1 and m0["report"]["executor"] == "inline"


def test_manifest_records_checksums_and_verifies(prepared):
    out, m = prepared
    for split in ("train", "val"):
        for sh in m["splits"][split]["shards"]:
            assert hashlib.sha256((out / sh["file"]).read_bytes()).hexdigest() == sh["sha256"]
            assert (out / sh["file"]).stat().st_size == sh["bytes"]
            assert np.load(out / sh["index"])[-1] <= sh["bytes"]
    assert m["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert m["tokenizer"]["source"] == "trained" and m["vocab_size"] == 400
    assert m["seed"] == 3 and m["seq_len"] == 32 and m["sources"][0]["kind"] == "directory"
    assert m["documents"]["invalid_utf8_documents"] == 1 and m["documents"]["invalid_utf8_bytes"] == 3
    assert verify_dataset(str(out))["fingerprint"] == m["fingerprint"]
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == m["fingerprint"]


def test_shards_read_with_tar_and_webdataset(prepared):
    import webdataset as wds
    out, m = prepared
    sh = m["splits"]["train"]["shards"][1]
    names = subprocess.run(["tar", "-tf", str(out / sh["file"])], check=True, capture_output=True,
                           text=True).stdout.split()
    first = sh["first_sample"]
    assert names[:4] == [f"train-{first:09d}.tokens.npy", f"train-{first:09d}.cu_seqlens.npy",
                         f"train-{first + 1:09d}.tokens.npy", f"train-{first + 1:09d}.cu_seqlens.npy"]
    assert len(names) == 2 * sh["samples"]
    ds = wds.WebDataset([str(out / s["file"]) for s in m["splits"]["train"]["shards"]], shardshuffle=False).decode()
    loader = TokenLoader(str(out), "train", 1, loop=False, return_indices=True)
    n = 0
    for sample, batch in zip(ds, loader):
        t = sample["tokens.npy"]
        assert sample["__key__"] == f"train-{int(batch['indices'][0]):09d}"
        assert np.array_equal(t[:-1], batch["input_ids"][0].numpy())
        n += 1
    assert n == m["splits"]["train"]["samples"]


def test_mixed_sources_custom_field_and_given_tokenizer(ray_cluster, prepared, tmp_path):
    out, m = prepared
    root = write_mixed_corpus(tmp_path / "mixed", field="content")
    m2 = prepare_dataset([str(root), str(root / "sub")], str(tmp_path / "d"), workers=2, text_field="content",
                         tokenizer_path=str(out / "tokenizer.json"), **{**OPTS, "val_fraction": 0.0})
    assert m2["tokenizer"]["source"] == "given" and m2["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]
    assert m2["tokenizer"]["added_special_tokens"] == []
    assert [s["kind"] for s in m2["sources"]] == ["directory", "directory"]
    assert m2["splits"]["train"]["documents"] == 25 + 5 + 11 + 5 and m2["splits"]["val"]["samples"] == 0
    assert m2["documents"]["empty_documents"] == 1 and m2["text_field"] == "content"
    with pytest.raises(ValueError, match="split 'val' .* has no samples"):
        TokenLoader(str(tmp_path / "d"), "val", 2)


def test_stdlib_subset(ray_cluster, tmp_path):
    m = prepare_dataset("default", str(tmp_path / "std"), vocab_size=512, seq_len=128, workers=2,
                        max_documents=40, val_fraction=0.05, progress=False)
    assert m["sources"][0]["kind"] == "stdlib" and m["documents"]["documents"] == 40
    assert m["splits"]["train"]["tokens"] > 10_000
    b = next(iter(TokenLoader(str(tmp_path / "std"), "train", 4)))
    assert b["input_ids"].shape == (4, 128) and int(b["input_ids"].max()) < m["vocab_size"]


def test_bad_sources_fail_before_writing(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass --source default"):
        prepare_dataset(str(tmp_path / "missing"), str(tmp_path / "o1"), **OPTS)
    assert not (tmp_path / "o1").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.txt").write_bytes(b"")
    with pytest.raises(SourceError, match="no non-empty"):
        prepare_dataset(str(empty), str(tmp_path / "o2"), workers=2, **OPTS)
    with pytest.raises(SourceError, match="no non-empty"):   # with a given tokenizer the check comes later
        prepare_dataset(str(empty), str(tmp_path / "o3"), workers=2, tokenizer_path=str(prepared[0]), **OPTS)
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_existing_dataset_is_never_clobbered(prepared, corpus):
    out, _ = prepared
    before = dataset_files(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(str(corpus), str(out), workers=2, **OPTS)
    assert dataset_files(out) == before


def test_interrupted_write_leaves_no_dataset_and_rerun_recovers(prepared, corpus, tmp_path, monkeypatch):
    out_ref, m_ref = prepared
    out = tmp_path / "interrupted"
    real = prep._write_shard
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash while writing shards")
        return real(*args)

    monkeypatch.setattr(prep, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(str(corpus), str(out), workers=2, **OPTS)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    with pytest.raises(ManifestError, match="preparation did not finish"):
        TokenLoader(str(out), "train", 2)
    monkeypatch.setattr(prep, "_write_shard", real)
    (out / "train-000099.tar").write_bytes(b"stale junk from an older run")
    m = prepare_dataset(str(corpus), str(out), workers=2, **OPTS)
    assert m["fingerprint"] == m_ref["fingerprint"] and dataset_files(out) == dataset_files(out_ref)


def test_cli(ray_cluster, corpus, tmp_path, capsys):
    import argparse
    from data_pipeline import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-data", "--source", str(corpus), "--out", str(tmp_path / "c"), "--vocab-size",
                              "300", "--seq-len", "64", "--workers", "2", "--no-progress", "--val-fraction", "0.1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "3 invalid UTF-8 bytes replaced in 1 documents" in printed
    assert load_tokenizer(str(tmp_path / "c")).vocab_size == 300
    args = parser.parse_args(["prepare-data", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert args.func(args) == 2
    assert "does not exist" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "nl_pretrain.cli", "prepare-data", "--source", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "y")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and f"source path '{tmp_path / 'nope'}' does not exist" in r.stderr


def test_errors_inside_ray_tasks_surface_unchanged(prepared, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(SourceError, match=r"a\.jsonl: the line at byte 39 is not valid JSON"):
        prepare_dataset(str(bad), str(tmp_path / "o"), workers=2, tokenizer_path=str(prepared[0]), **OPTS)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_fingerprint_ignores_where_the_corpus_lives(prepared, corpus, tmp_path):
    import shutil
    moved = tmp_path / "elsewhere"
    shutil.copytree(corpus, moved)
    m = prepare_dataset(str(moved), str(tmp_path / "d"), workers=2, **OPTS)
    assert m["sources"][0]["root"] != prepared[1]["sources"][0]["root"]
    assert m["fingerprint"] == prepared[1]["fingerprint"]
