"""Small corpora built in temporary directories for the data-pipeline tests."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Tuple

WORDS = ("the memory update reads a key and writes a value def class return import yield lambda "
         "chunk token sequence gradient momentum decay retention layer head width über naïve 数据 🙂").split()


def sentence(rng: random.Random, n: int) -> str:
    lines, line = [], []
    for _ in range(n):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.1:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines)


def write_text_corpus(root: Path, n_docs: int = 60, seed: int = 0, max_words: int = 300) -> Path:
    """n_docs .txt files of varied length, one empty, one with invalid UTF-8 (3 bad bytes),
    one holding literal special-token strings, plus a hidden file and an ignored suffix."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i:03d}.txt").write_text(sentence(rng, rng.randint(1, max_words)), encoding="utf-8")
    (root / "doc_empty.txt").write_bytes(b"")
    (root / "doc_bad.txt").write_bytes(b"valid start \xff middle \xfe\xfd end of the bad document")
    (root / "doc_special.txt").write_text("text with <|bos|> and <|eos|> and <|pad|> inside it", encoding="utf-8")
    (root / ".hidden.txt").write_text("never read")
    (root / "notes.csv").write_text("a,b\n1,2\n")
    return root


def write_mixed_corpus(root: Path, seed: int = 1, field: str = "text") -> Path:
    """A directory with .txt, .jsonl (with a blank line) and .parquet (small row groups, one null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    sub = root / "sub"
    sub.mkdir(exist_ok=True)
    for i in range(5):
        (sub / f"a{i}.txt").write_text(sentence(rng, rng.randint(5, 200)), encoding="utf-8")
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(25):
            f.write(json.dumps({field: sentence(rng, rng.randint(1, 150)), "id": i}) + "\n")
            if i == 10:
                f.write("\n")
    texts = [sentence(rng, rng.randint(1, 150)) for _ in range(11)] + [None]
    pq.write_table(pa.table({field: texts, "n": list(range(12))}), root / "table.parquet", row_group_size=4)
    return root


def corpus_documents(source, text_field: str = "text") -> List[str]:
    """Every document of a source in document order (via the pipeline's own reader)."""
    from data_pipeline.sources import list_units, read_unit
    return [d.text for u in list_units(source, text_field).units for d in read_unit(u, text_field)]


def read_tar_samples(path: Path) -> List[Tuple[str, "object", "object"]]:
    """(key, tokens, cu_seqlens) of every sample of a shard, read with the standard tarfile module."""
    import io
    import tarfile
    import numpy as np
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = np.load(io.BytesIO(tf.extractfile(m).read()))
    return [(k, v["tokens.npy"], v["cu_seqlens.npy"]) for k, v in out.items()]
