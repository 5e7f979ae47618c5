"""Sources: listing order, readers (.txt/.jsonl/.parquet), UTF-8 replacement, split hash, errors."""
import json
import random

import pytest

from data_pipeline import sources
from data_pipeline.sources import (SourceError, decode_utf8, is_validation, list_units, read_unit,
                                   stdlib_root)
from dp_corpus import corpus_documents, write_mixed_corpus, write_text_corpus


def test_listing_is_sorted_skips_hidden_and_counts_ignored(tmp_path):
    root = write_text_corpus(tmp_path / "c", n_docs=12)
    listing = list_units(str(root))
    rels = [u.rel for u in listing.units]
    assert rels == sorted(rels)
    assert ".hidden.txt" not in rels and "notes.csv" not in rels
    assert len(rels) == 12 + 3
    assert listing.sources[0]["ignored_files"] == 1 and listing.sources[0]["files"] == 15
    assert list_units(str(root)).units == listing.units       # deterministic


def test_mixed_formats_documents_in_order(tmp_path):
    root = write_mixed_corpus(tmp_path / "m", field="content")
    units = list_units(str(root), text_field="content").units
    assert [u.rel for u in units] == ["records.jsonl"] + [f"sub/a{i}.txt" for i in range(5)] + ["table.parquet"] * 3
    assert [u.kind for u in units] == ["jsonl"] + ["text"] * 5 + ["parquet"] * 3
    docs = corpus_documents(str(root), "content")
    lines = [json.loads(l)["content"] for l in (root / "records.jsonl").read_text().splitlines() if l.strip()]
    assert docs[:25] == lines                               # the blank line is not a document
    assert len(docs) == 25 + 5 + 12 and docs[-1] == ""      # the parquet null is an empty document
    assert docs[29] == (root / "sub" / "a4.txt").read_text()


def test_jsonl_byte_ranges_neither_lose_nor_repeat_lines(tmp_path, monkeypatch):
    root = write_mixed_corpus(tmp_path / "m")
    whole = corpus_documents(str(root / "records.jsonl"))
    monkeypatch.setattr(sources, "JSONL_UNIT_BYTES", 97)     # ranges that cut lines anywhere
    units = list_units(str(root / "records.jsonl")).units
    assert len(units) > 10
    assert [d.text for u in units for d in read_unit(u)] == whole


def test_max_documents_keeps_the_first_documents(tmp_path, monkeypatch):
    root = write_mixed_corpus(tmp_path / "m")
    monkeypatch.setattr(sources, "JSONL_UNIT_BYTES", 200)
    full = corpus_documents(str(root))
    units = list_units(str(root), max_documents=7).units
    assert [d.text for u in units for d in read_unit(u)] == full[:7]
    units = list_units(str(root), max_documents=29).units
    assert [d.text for u in units for d in read_unit(u)] == full[:29]


def test_decode_utf8_replaces_and_counts_invalid_bytes():
    assert decode_utf8("naïve \ufffd ok".encode()) == ("naïve \ufffd ok", 0)   # a real U+FFFD is not counted
    text, bad = decode_utf8(b"a\xffb\xfe\xfdc\xe2\x82")                         # \xe2\x82: truncated sequence
    assert text == "a\ufffdb\ufffd\ufffdc\ufffd" and bad == 5


def test_invalid_utf8_in_jsonl_and_lone_surrogates(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "caf\xe9 ok"}\n{"text": "lone \\ud800 surrogate"}\n')
    docs = [d for u in list_units(str(p)).units for d in read_unit(u)]
    assert docs[0].text == "caf\ufffd ok" and docs[0].invalid_bytes == 1
    assert "\ufffd" in docs[1].text and docs[1].invalid_bytes > 0
    docs[1].text.encode("utf-8")                              # encodable: nothing left for the tokenizer to choke on


def test_split_is_a_content_hash():
    rng = random.Random(0)
    texts = [f"document {i} {rng.random()}".encode() for i in range(4000)]
    frac = sum(is_validation(t, 0.1) for t in texts) / len(texts)
    assert 0.08 < frac < 0.12
    assert [is_validation(t, 0.1) for t in texts] == [is_validation(t, 0.1) for t in texts]
    assert not any(is_validation(t, 0.0) for t in texts)
    other = [is_validation(t, 0.1, seed=7) for t in texts]
    assert other != [is_validation(t, 0.1) for t in texts]     # the seed keys the split


def test_missing_path_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        list_units(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value) and "--source default" in str(e.value)


def test_empty_directory_and_unsupported_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("1")
    with pytest.raises(SourceError, match="holds no"):
        list_units(str(tmp_path / "d"))
    with pytest.raises(SourceError, match="suffix"):
        list_units(str(tmp_path / "d" / "x.csv"))


def test_bad_jsonl_records_name_file_and_offset(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(SourceError, match=r"a\.jsonl: the line at byte 17 is not valid JSON"):
        list(read_unit(list_units(str(p)).units[0]))
    p.write_text('{"body": "no text field"}\n')
    with pytest.raises(SourceError, match="no field 'text' .*body.*--text-field"):
        list(read_unit(list_units(str(p)).units[0]))
    p.write_text('{"text": 3}\n')
    with pytest.raises(SourceError, match="is a int, not a string"):
        list(read_unit(list_units(str(p)).units[0]))


def test_parquet_missing_column(tmp_path):
    root = write_mixed_corpus(tmp_path / "m")
    with pytest.raises(SourceError, match="no column 'body'.*columns: text, n"):
        list_units(str(root / "table.parquet"), text_field="body")


def test_stdlib_corpus_listing():
    listing = list_units("default")
    rels = [u.rel for u in listing.units]
    assert len(rels) > 500 and rels == sorted(rels)
    assert all(r.endswith(".py") and "site-packages" not in r for r in rels)
    assert listing.sources[0]["kind"] == "stdlib" and listing.sources[0]["root"] == str(stdlib_root().resolve())
    assert listing.total_bytes > 5_000_000
    assert len(list_units(None, max_documents=5).units) == 5
