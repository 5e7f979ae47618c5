"""Byte-level BPE: deterministic training, special tokens, round trips, given tokenizers, hashes."""
import json
import subprocess
import sys

import pytest

from data_pipeline.tokenizer import (BOS, EOS, PAD, TextTokenizer, TokenizerError, load_tokenizer, prepare_given,
                                     sha256_bytes, train_bpe)
from dp_corpus import corpus_documents, write_text_corpus

TRAIN = """
import sys
sys.path.insert(0, {here!r})
from dp_corpus import corpus_documents
from data_pipeline.tokenizer import train_bpe, sha256_bytes
print(sha256_bytes(train_bpe(corpus_documents({src!r}), 600).encode()))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("tok") / "c", n_docs=40)


@pytest.fixture(scope="module")
def tok(corpus):
    return TextTokenizer(train_bpe(corpus_documents(str(corpus)), 600))


def test_training_is_deterministic_across_processes(corpus, tok):
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    hashes = {subprocess.run([sys.executable, "-c", TRAIN.format(here=here, src=str(corpus))], check=True,
                             capture_output=True, text=True).stdout.strip() for _ in range(2)}
    assert hashes == {tok.sha256}


def test_special_tokens_and_vocab(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 256 + 3 < tok.vocab_size <= 600


def test_round_trip_and_literal_special_strings_stay_text(tok):
    texts = ["def f(x):\n\treturn x  # über 数据 🙂\n", "  leading spaces\r\nand CRLF", f"a {BOS} b {EOS} c {PAD}"]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode([tok.bos_id] + tok.encode("x") + [tok.eos_id]) == "x"


def test_vocab_too_small():
    with pytest.raises(TokenizerError, match=r"vocab_size \(100\) must be at least 259"):
        train_bpe(["abc"], 100)


def test_given_tokenizer_gets_missing_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["hello world"] * 10, trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    js, added = prepare_given(str(tmp_path))
    assert added == [PAD, BOS, EOS]
    tt = TextTokenizer(js)
    assert len({tt.pad_id, tt.bos_id, tt.eos_id}) == 3 and tt.vocab_size == t.get_vocab_size() + 3
    with pytest.raises(FileNotFoundError, match="leave --tokenizer out"):
        prepare_given(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        prepare_given(str(tmp_path / "junk.json"))


def test_load_tokenizer_checks_the_manifest_hash(tmp_path, tok):
    js = tok._tok.to_str()
    (tmp_path / "tokenizer.json").write_text(js)
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": sha256_bytes(js.encode())}}))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("return x") == tok.encode("return x") and loaded.vocab_size == tok.vocab_size
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "0" * 64}}))
    with pytest.raises(TokenizerError, match="replaced after preparation"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        load_tokenizer(str(tmp_path / "nothing"))
