"""Packed sequences: every document runs as if alone.

A packed batch ``(B, T)`` with ``doc_ids`` (a new value marks a document start) is re-laid into one
row per document, right-padded to the longest document; the model runs on those rows and the
results go back to their packed places. Memories, convolutions, attention and positions therefore
restart at every document, exactly as if the documents were run one by one.
"""
from __future__ import annotations

from typing import Optional

import torch


class DocumentLayout:
    def __init__(self, doc_ids: torch.Tensor):
        B, T = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        seg = starts.long().cumsum(1) - 1                     # document index within the row
        n_per_row = seg[:, -1] + 1
        row_offset = torch.cumsum(n_per_row, 0) - n_per_row
        self.segment = (seg + row_offset[:, None]).reshape(-1)   # global document id per token
        pos = torch.arange(T, device=doc_ids.device).expand(B, T)
        start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        self.position = (pos - start_pos).reshape(-1)            # position inside its document
        self.n_docs = int(n_per_row.sum())
        self.max_len = int(self.position.max()) + 1
        self.shape = (B, T)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(n_docs, max_len, D)`` (zero padding at document ends)."""
        D = x.shape[-1]
        out = x.new_zeros(self.n_docs * self.max_len, D)
        out = out.index_copy(0, self.segment * self.max_len + self.position, x.reshape(-1, D))
        return out.view(self.n_docs, self.max_len, D)

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        D = y.shape[-1]
        flat = y.reshape(-1, D).index_select(0, self.segment * self.max_len + self.position)
        return flat.view(*self.shape, D)


def run_documents(blocks, x: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``blocks`` applied in turn to every document of the packed ``x`` as if it ran alone."""
    layout = layout_for(doc_ids)
    if layout is not None:
        x = layout.unpack(x)
    for block in blocks:
        x = block(x)
    return layout.pack(x) if layout is not None else x


def layout_for(doc_ids: Optional[torch.Tensor]) -> Optional[DocumentLayout]:
    """None when there is nothing to unpack (no ids, or one document per row)."""
    if doc_ids is None:
        return None
    if bool((doc_ids == doc_ids[:, :1]).all()):
        return None
    return DocumentLayout(doc_ids)
