"""Byte-level BPE tokenizer (HuggingFace ``tokenizers``): train, load, hash.

Special tokens ``<|pad|>``, ``<|bos|>``, ``<|eos|>`` (ids 0, 1, 2 when we train; appended when a
given tokenizer lacks them). Text is always encoded with ``encode_special_tokens = True``, so a
literal ``<|bos|>`` inside a document is ordinary text and never becomes a special id; only the
packer inserts BOS and EOS. The tokenizer's identity is the sha256 of the ``tokenizer.json`` bytes
stored in the dataset directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> str:
    """Train a byte-level BPE on ``texts`` (in order); returns the tokenizer as a JSON string.
    Deterministic: the same texts give the same bytes (checked in tests across processes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size ({vocab_size}) must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); pass --vocab-size 4096 or more")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def prepare_given(path: str) -> Tuple[str, List[str]]:
    """A user's tokenizer.json with our special tokens present (added when missing).
    Returns (json string, names of the special tokens that were added)."""
    from tokenizers import Tokenizer
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer '{path}' does not exist; pass a tokenizer.json file (or a dataset "
                                f"directory holding one), or leave --tokenizer out to train one")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:
        raise TokenizerError(f"'{p}' is not a tokenizers JSON file ({exc}); pass a file saved by "
                             f"tokenizers' Tokenizer.save") from exc
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok.to_str(), missing


class TextTokenizer:
    """What training and evaluation code needs: encode / decode and the special ids."""

    def __init__(self, json_str: str, sha256: Optional[str] = None):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_str(json_str)
        self._tok.encode_special_tokens = True
        self.sha256 = sha256 or sha256_bytes(json_str.encode("utf-8"))
        ids = [self._tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise TokenizerError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}; prepare it with "
                                 f"data_pipeline.tokenizer.prepare_given")
        self.pad_id, self.bos_id, self.eos_id = ids
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str) -> "TextTokenizer":
        data = Path(path).read_bytes()
        return cls(data.decode("utf-8"), sha256_bytes(data))

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: List[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(dataset_dir: str) -> TextTokenizer:
    """The tokenizer of a prepared dataset (or a tokenizer.json path). When the directory has a
    manifest, the file's sha256 must match the one recorded there."""
    p = Path(dataset_dir)
    path = p / TOKENIZER_FILE if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at '{path}'; prepare the dataset with `nl-pretrain prepare-data "
                                f"--out {dataset_dir}` first")
    tok = TextTokenizer.from_file(str(path))
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        want = json.loads(manifest.read_text())["tokenizer"]["sha256"]
        if want != tok.sha256:
            raise TokenizerError(f"'{path}' has sha256 {tok.sha256[:16]}..., but {manifest} records "
                                 f"{want[:16]}...; the tokenizer was replaced after preparation: restore it or "
                                 f"prepare the dataset again")
    return tok
