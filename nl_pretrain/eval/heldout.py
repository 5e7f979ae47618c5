"""Held-out loss, perplexity and loss by position in the context (the paper's Figure-10 view).

Sequences come from a prepared dataset's validation split (``--dataset``) or from a directory of
text files tokenized with the run's tokenizer (``--text``: each file one document,
``[BOS] tokens [EOS]``, concatenated and cut into windows of ``seq_len + 1``). The loss is the
training function's (packed documents restart the model). The position of a prediction is the
index of its input token in what the model has seen of the document (0 at the later of the window
start and the document start; the prediction follows position + 1 tokens of context); positions are
grouped into power-of-two buckets ``[0, 1), [1, 2), [2, 4), ...``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, List

import torch
import torch.nn.functional as F

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


def text_windows(directory: str, tokenizer, seq_len: int) -> Iterator[dict]:
    """``input_ids, labels, doc_ids`` rows of ``seq_len`` from the text files under ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--text {directory}: not a directory; pass a directory of {'/'.join(TEXT_SUFFIXES)} "
                                f"files (or --dataset with a prepared dataset)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"--text {directory} holds no {'/'.join(TEXT_SUFFIXES)} files")
    toks: List[int] = []
    docs: List[int] = []
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8", errors="replace")
        ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
        toks += ids
        docs += [i] * len(ids)
    n = (len(toks) - 1) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"--text {directory} has {len(toks)} tokens, fewer than one window of {seq_len + 1}; "
                         f"add text or lower --seq-len")
    t, d = torch.tensor(toks), torch.tensor(docs)
    for w in range(n):
        s = w * (seq_len + 1)
        tok, doc = t[s:s + seq_len + 1], d[s:s + seq_len + 1]
        labels = torch.where(doc[1:] == doc[:-1], tok[1:], torch.full_like(tok[1:], -100))
        yield {"input_ids": tok[:-1], "labels": labels, "doc_ids": doc[:-1] - doc[0]}


def batched(rows: Iterator[dict], batch_size: int) -> Iterator[dict]:
    buf = []
    for r in rows:
        buf.append(r)
        if len(buf) == batch_size:
            yield {k: torch.stack([b[k] for b in buf]) for k in buf[0]}
            buf = []
    if buf:
        yield {k: torch.stack([b[k] for b in buf]) for k in buf[0]}


def context_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: index of each token from the later of the row start and its document start."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = torch.arange(T).expand(B, T)
    return pos - torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values


def bucket_edges(seq_len: int) -> List[int]:
    edges = [0, 1]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 2)
    return edges


@torch.no_grad()
def heldout_loss(model, batches: Iterator[dict], seq_len: int, max_batches: int, device) -> dict:
    """Mean loss over every labelled token, perplexity, and the loss per position bucket."""
    edges = bucket_edges(seq_len)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    seen = 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        ids, labels, doc = (batch[k].to(device) for k in ("input_ids", "labels", "doc_ids"))
        logits = model(ids, doc).float()
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").cpu().double()
        mask = labels.cpu() != -100
        pos = context_positions(batch["doc_ids"])
        bucket = torch.bucketize(pos, torch.tensor(edges[1:]), right=True)
        sums.index_add_(0, bucket[mask], loss[mask])
        counts.index_add_(0, bucket[mask], torch.ones_like(bucket[mask]))
        seen += ids.shape[0]
    if seen == 0:
        raise ValueError("no held-out sequences to evaluate (empty validation split); prepare the dataset with "
                         "--val-fraction > 0 or evaluate --text DIR")
    total = float(sums.sum() / counts.sum())
    buckets = [{"start": edges[j], "end": edges[j + 1], "tokens": int(counts[j]),
                "loss": float(sums[j] / counts[j]) if counts[j] else None} for j in range(len(counts))]
    return {"loss": total, "ppl": math.exp(min(total, 700.0)), "sequences": seen, "tokens": int(counts.sum()),
            "seq_len": seq_len, "buckets": buckets}


def plot_positions(result: dict, path: str, title: str) -> None:
    """Loss per position bucket (x: tokens of context seen, one point per power-of-two bucket) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [(str(b["start"]) if b["end"] - b["start"] == 1 else f"{b['start']}-{b['end'] - 1}", b["loss"])
           for b in result["buckets"] if b["loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(pts)), [p[1] for p in pts], marker="o")
    ax.set_xticks(range(len(pts)), [p[0] for p in pts], rotation=45, ha="right")
    ax.set_xlabel("position in the context (tokens seen - 1)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
