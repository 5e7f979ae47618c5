"""Recurrent decoding of any family, exactly the training-time function (docs/INFERENCE.md).

A block's layers keep one of three states per sequence:

- attention: a :class:`~nl_pretrain.model.attention.KVCache` (grows with the context);
- a layer with fast weights (SMT, a CMS context level): :class:`StreamState`, the layer's carry
  (:class:`~nl_pretrain.model.carry.Carry`) at the last multiple of its ``doc_alignment`` (every
  chunk boundary of every memory it holds), plus the inputs of the tokens since then (fewer than one
  alignment). A new token is appended and that partial chunk is run again from the carried state, so
  every read and gradient inside it uses the chunk-start state exactly as in training; when the
  chunk completes, its final state becomes the carry. O(alignment) work per token, constant in the
  context, and a state whose size does not depend on the number of tokens;
- anything else (a CMS step level, an MLP): nothing.

Rows are independent: each may be at its own position (prompts of different lengths) and may start
a new document (``new_doc``), which puts that row back to the learned initial state, as a packed
document starts in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from nl_pretrain.model.attention import Attention, KVCache
from nl_pretrain.model.carry import Carry


@dataclass
class StreamState:
    carry: Carry               # the layer's state at the last chunk-aligned position of each row
    pending: torch.Tensor      # (B, alignment, d): inputs since then (the first ``count[b]`` are real)
    count: torch.Tensor        # (B,) long


def _rows(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mask (B,)`` broadcast over a state tensor whose first dimension is B or B*H (batch-major)."""
    m = mask.repeat_interleave(t.shape[0] // mask.shape[0])
    return m.view(-1, *([1] * (t.dim() - 1)))


def carry_where(mask: torch.Tensor, a: Carry, b: Carry) -> Carry:
    """Per row: ``a`` where ``mask`` is true, else ``b``."""
    def pick(x, y):
        if x is None:
            return None
        return tuple(torch.where(_rows(mask, u), u, w) for u, w in zip(x, y))
    return Carry({n: pick(a.states[n], b.states[n]) for n in a.states},
                 {n: pick(a.moms[n], b.moms[n]) for n in a.moms},
                 {n: torch.where(_rows(mask, a.conv[n]), a.conv[n], b.conv[n]) for n in a.conv})


def is_stateful(module) -> bool:
    return isinstance(module, Attention) or hasattr(module, "initial_carry")


def prefill_layer(module, x: torch.Tensor, lengths: torch.Tensor):
    """``x (B, T, d)`` right-padded, row b real up to ``lengths[b]``: ``(output (B, T, d), state)``
    through the chunk-parallel path. Fast-weight layers run in segments cut at the chunk-aligned
    positions where some row's carry has to be taken (at most B + 1 calls)."""
    B, T, _ = x.shape
    if isinstance(module, Attention):
        cache = KVCache(B, module.n_heads, module.d_head, T, x)
        y, cache = module(x, cache=cache)
        cache.length = lengths.clone()
        return y, cache
    if not hasattr(module, "initial_carry"):
        return module(x), None
    L = module.doc_alignment
    aligned = lengths // L * L
    carry = module.initial_carry(B)
    kept = carry
    outs, start = [], 0
    for end in sorted(set(aligned.tolist()) | {T}):
        if end > start:
            y, carry = module(x[:, start:end], carry=carry)
            outs.append(y)
            start = end
        kept = carry_where(aligned == end, carry, kept)
    pending = x.new_zeros(B, L, x.shape[-1])
    count = lengths - aligned
    for b in range(B):
        a, n = int(aligned[b]), int(count[b])
        pending[b, :n] = x[b, a:a + n]
    return torch.cat(outs, 1), StreamState(kept, pending, count)


def step_layer(module, x: torch.Tensor, state, new_doc: Optional[torch.Tensor]):
    """One token per row, ``x (B, 1, d)``: ``(output (B, 1, d), new state)``."""
    if isinstance(module, Attention):
        if new_doc is not None:
            state.start = torch.where(new_doc, state.length, state.start)
        return module(x, cache=state)
    if state is None:
        return module(x), None
    B = x.shape[0]
    carry, count = state.carry, state.count
    if new_doc is not None and bool(new_doc.any()):
        carry = carry_where(new_doc, module.initial_carry(B), carry)
        count = torch.where(new_doc, torch.zeros_like(count), count)
    rows = torch.arange(B, device=x.device)
    pending = state.pending.clone()
    pending[rows, count] = x[:, 0]
    count = count + 1
    y, after = module(pending[:, :int(count.max())], carry=carry)   # the partial chunk, from its start state
    y = y[rows, count - 1][:, None]
    done = count == state.pending.shape[1]
    if bool(done.any()):          # a chunk completed (such rows have no padding): its end state is the carry
        carry = carry_where(done, after, carry)
        count = torch.where(done, torch.zeros_like(count), count)
    return y, StreamState(carry, pending, count)


class DecodeState:
    """Every layer's state for a batch of sequences (``layers[i]``: block i's mixer then its CMS levels)."""

    def __init__(self, layers: List[list], lengths: torch.Tensor):
        self.layers = layers
        self.lengths = lengths            # tokens seen per row (all documents)

    def nbytes(self) -> int:
        """Bytes of the whole batch's state: fast weights, momenta, convolution inputs, the pending
        chunk, and KV caches up to the longest row (capacity slack not counted)."""
        total = 0
        for block in self.layers:
            for st in block:
                if isinstance(st, KVCache):
                    n = int(st.length.max()) if st.length.numel() else 0
                    total += 2 * st.k[:, :, :n].numel() * st.k.element_size()
                elif isinstance(st, StreamState):
                    total += sum(t.numel() * t.element_size() for t in st.carry.tensors())
                    total += st.pending.numel() * st.pending.element_size()
        return total

    def nbytes_per_sequence(self) -> int:
        return self.nbytes() // max(1, int(self.lengths.shape[0]))


def block_layers(block):
    return [block.mixer, *block.levels]


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, lengths: torch.Tensor):
    """``(logits (B, T, V), DecodeState)`` of right-padded prompts (mirrors :class:`Block.forward`)."""
    x = model.embed(tokens)
    layers = []
    for block in model.blocks:
        y, mixer_state = prefill_layer(block.mixer, block.norm(x), lengths)
        z, states = x + y, [mixer_state]
        for norm, level in zip(block.level_norms, block.levels):
            y, st = prefill_layer(level, norm(z), lengths)
            z = z + y
            states.append(st)
        x = z
        layers.append(states)
    return model.logits(model.norm(x)), DecodeState(layers, lengths.clone())


@torch.no_grad()
def step(model, tokens: torch.Tensor, state: DecodeState, new_doc: Optional[torch.Tensor] = None):
    """``tokens (B,)`` -> ``(logits (B, V), state)``; ``new_doc (B,)`` bool: the token starts a document."""
    x = model.embed(tokens)[:, None]
    layers = []
    for block, states in zip(model.blocks, state.layers):
        y, mixer_state = step_layer(block.mixer, block.norm(x), states[0], new_doc)
        z, new = x + y, [mixer_state]
        for norm, level, st in zip(block.level_norms, block.levels, states[1:]):
            y, st = step_layer(level, norm(z), st, new_doc)
            z = z + y
            new.append(st)
        x = z
        layers.append(new)
    return model.logits(model.norm(x))[:, 0], DecodeState(layers, state.lengths + 1)
