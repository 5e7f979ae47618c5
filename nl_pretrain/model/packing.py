"""Packed sequences: every document runs as if alone, at the cost of its own tokens.

A packed batch ``(B, T)`` with ``doc_ids`` (a new value marks a document start) is re-laid in place:
each row keeps its documents, but every document is moved to start at a multiple of the model's
chunk alignment (the least common multiple of its memory chunk sizes; 1 for Transformer++), so a
row grows by less than one chunk per document instead of becoming one row per document padded to
the longest. The layers see the layout through :class:`Documents`:

- memories restart at every chunk where a document starts (``resets``: the kernels reload the
  learned initial state and zero the momentum there), so chunk boundaries inside a document are
  exactly those it has when run alone;
- causal convolutions mask the taps that reach into the previous document;
- attention masks keys of other documents, and RoPE positions count from each document's start.

Padding positions (after a document, up to the next chunk boundary, and at the end of short rows)
belong to the document before them: they come after its real tokens, so nothing real ever reads
them, and the next document's reset discards whatever they wrote.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Optional

import torch


class Documents:
    def __init__(self, doc_ids: torch.Tensor, align: int):
        B, T = doc_ids.shape
        dev = doc_ids.device
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        seg = starts.long().cumsum(1) - 1                                   # document index in its row
        n_per_row = seg[:, -1] + 1
        first = torch.cumsum(n_per_row, 0) - n_per_row                      # global id of a row's first doc
        gdoc = (seg + first[:, None]).reshape(-1)                           # global document id per token
        n_docs = int(n_per_row.sum())
        lengths = torch.zeros(n_docs, dtype=torch.long, device=dev).index_add_(
            0, gdoc, torch.ones_like(gdoc))
        padded = (lengths + align - 1) // align * align
        row_of = torch.repeat_interleave(torch.arange(B, device=dev), n_per_row)
        ends = torch.cumsum(padded, 0)
        row_start = (ends - padded)[first]                                  # offset of each row's first doc
        offset = ends - padded - row_start[row_of]                          # doc start inside its row
        row_len = torch.zeros(B, dtype=torch.long, device=dev).index_add_(0, row_of, padded)
        self.length = int(row_len.max())                                    # T' of the re-laid rows
        pos = torch.arange(T, device=dev).expand(B, T)
        start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        in_doc = (pos - start_pos).reshape(-1)
        self.dest = (row_of[gdoc] * self.length + offset[gdoc] + in_doc)    # flat index in (B, T')
        self.shape = (B, T)
        # metadata on the new layout: document id, position in it, and where documents start
        start_new = torch.zeros(B * self.length, dtype=torch.long, device=dev)
        start_new[row_of * self.length + offset] = 1
        local = start_new.view(B, self.length).cumsum(1) - 1                 # doc index in row (pads: previous)
        doc_new = local + first[:, None]
        self.doc = doc_new                                                  # (B, T')
        self.position = torch.arange(self.length, device=dev)[None] - offset[doc_new]
        self.start = start_new.view(B, self.length).bool()
        self.align = align

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T', D)`` (zeros at padding positions)."""
        B, _, D = x.shape
        out = x.new_zeros(B * self.length, D).index_copy(0, self.dest, x.reshape(-1, D))
        return out.view(B, self.length, D)

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        D = y.shape[-1]
        return y.reshape(-1, D).index_select(0, self.dest).view(*self.shape, D)

    def resets(self, chunk: int, heads: int) -> torch.Tensor:
        """``(B * heads, n_chunks)`` bool, rows batch-major like ``to_rows``: a document starts at
        this chunk. ``chunk`` must divide the alignment (it does for the model's own chunks)."""
        if self.align % chunk:
            raise ValueError(f"chunk {chunk} does not divide the document alignment {self.align}")
        return self.start[:, ::chunk].repeat_interleave(heads, 0)

    def conv_mask(self, lag: int) -> torch.Tensor:
        """``(B, T', 1)``: true where the input ``lag`` steps back is in the same document."""
        return (self.position >= lag)[..., None]

    def attention_mask(self) -> torch.Tensor:
        """``(B, 1, T', T')`` bool: key in the same document and not in the future."""
        T = self.length
        causal = torch.ones(T, T, dtype=torch.bool, device=self.doc.device).tril()
        return (self.doc[:, :, None] == self.doc[:, None, :])[:, None] & causal


def alignment(blocks) -> int:
    """The least common multiple of the chunk sizes the blocks' memories use (1 without memories)."""
    sizes = [getattr(m, "doc_alignment", 1) for b in blocks for m in b.modules()]
    return reduce(lambda a, b: a * b // math.gcd(a, b), sizes, 1)


def run_documents(blocks, x: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``blocks`` applied in turn to the packed ``x``, every document as if it ran alone."""
    docs = documents_for(doc_ids, lambda: alignment(blocks))
    if docs is None:
        for block in blocks:
            x = block(x)
        return x
    x = docs.unpack(x)
    for block in blocks:
        x = block(x, docs)
    return docs.pack(x)


def documents_for(doc_ids: Optional[torch.Tensor], align) -> Optional[Documents]:
    """None when there is nothing to re-lay (no ids, or one document per row). ``align``: an int or
    a function giving it (only called when there are documents to re-lay)."""
    if doc_ids is None:
        return None
    if bool((doc_ids == doc_ids[:, :1]).all()):
        return None
    return Documents(doc_ids, align() if callable(align) else align)
