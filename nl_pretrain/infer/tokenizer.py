"""The run's tokenizer, carried by checkpoints and exports so that inference decodes with it.

A prepared dataset (``data.dataset``) keeps its BPE tokenizer as ``tokenizer.json``; the built-in
byte corpus has ids 0-255 = bytes and BOS/EOS/PAD = 256/257/258, written here as an equivalent
``tokenizers`` JSON file (a byte-level BPE without merges), so both kinds load the same way (and
any Hugging Face tooling reads them). Checkpoints hold the JSON in ``common.pt`` (``tokenizer``),
exports as ``tokenizer.json`` next to the weights.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

TOKENIZER_FILE = "tokenizer.json"


def _bytes_to_unicode() -> dict:
    """The byte-level alphabet: printable bytes map to themselves, the others to code points from 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = dict(), 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


@functools.lru_cache(maxsize=None)
def byte_tokenizer_json() -> str:
    """The byte corpus (:mod:`nl_pretrain.train.byte_corpus`) as a ``tokenizers`` JSON string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from data_pipeline.tokenizer import BOS, EOS, PAD
    from nl_pretrain.train import byte_corpus as bc
    chars = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])            # 256, 257, 258 as in the byte corpus
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [bc.BOS, bc.EOS, bc.PAD]
    return tok.to_str()


def run_tokenizer_record(data_cfg) -> Optional[dict]:
    """``{"json", "source"}`` of the tokenizer a run's data section trains with (None when the
    dataset's tokenizer cannot be read: the checkpoint then carries none, and inference says so)."""
    if not data_cfg.dataset:
        return {"json": byte_tokenizer_json(), "source": "byte corpus"}
    path = Path(data_cfg.dataset) / TOKENIZER_FILE
    if not path.is_file():
        return None
    return {"json": path.read_text(encoding="utf-8"), "source": str(path)}


def load_tokenizer_json(json_str: str):
    from data_pipeline.tokenizer import TextTokenizer
    return TextTokenizer(json_str)


def load_tokenizer_path(path: str):
    """``--tokenizer``: a ``tokenizer.json``, a prepared dataset directory, or ``bytes`` (the byte corpus)."""
    if path == "bytes":
        return load_tokenizer_json(byte_tokenizer_json())
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json there; pass the prepared dataset directory "
                                f"the model was trained on, its tokenizer.json, or 'bytes' for the built-in byte "
                                f"corpus")
    return load_tokenizer_json(p.read_text(encoding="utf-8"))
