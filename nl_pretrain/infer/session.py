"""One loaded model for inference: :class:`Session` (docs/INFERENCE.md).

``Session.load(path)`` takes a training checkpoint (a ``step-XXXXXXXX`` directory or a checkpoint
root, any parallel layout: it is consolidated on load) or an ``nl-pretrain export`` directory, and
the run's tokenizer that either carries. ``prefill`` runs prompts through the chunk-parallel path,
``step`` decodes one token per row (:mod:`nl_pretrain.infer.decode`), ``generate`` samples text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from nl_pretrain.infer import decode
from nl_pretrain.infer.sampling import check_sampling, sample
from nl_pretrain.model.model import ATTENTION_FAMILIES


@dataclass
class Generation:
    texts: List[str]                   # generated text per prompt (the prompt not included)
    tokens: List[List[int]]            # generated ids per prompt (up to and including EOS)
    prompt_tokens: List[int]           # prompt length per prompt (BOS included)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0                # decoding steps x rows
    state_bytes: int = 0               # per sequence, at the end
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


class Session:
    def __init__(self, model, config, tokenizer, source: str = ""):
        self.model, self.config, self.tokenizer, self.source = model, config, tokenizer, source
        self.device = next(model.parameters()).device
        m = config.model
        self.attention = m.family in ATTENTION_FAMILIES
        self.max_len = m.max_seq_len if self.attention else None    # RoPE / KV: trained up to max_seq_len

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
             tokenizer: Optional[str] = None) -> "Session":
        """``tokenizer``: a ``tokenizer.json`` / dataset directory / ``bytes`` overriding (or supplying,
        for checkpoints written before tokenizers were carried) the one the path carries."""
        from nl_pretrain.infer.tokenizer import TOKENIZER_FILE, load_tokenizer_json, load_tokenizer_path
        from nl_pretrain.model import LanguageModel
        p = Path(path)
        if (p / "model.safetensors").is_file():
            from nl_pretrain.checkpoint.export import load_exported
            model, cfg = load_exported(str(p))
            tok_file = p / TOKENIZER_FILE
            carried = tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
            kind = "export"
        else:
            from nl_pretrain.checkpoint.export import consolidate
            _, common, cfg, tensors = consolidate(path)
            model = LanguageModel(cfg.model)
            model.load_state_dict(tensors, strict=True)
            carried = (common.get("tokenizer") or {}).get("json")
            kind = "checkpoint"
        if tokenizer is not None:
            tok = load_tokenizer_path(tokenizer)
        elif carried is not None:
            tok = load_tokenizer_json(carried)
        else:
            raise ValueError(f"{kind} {path} carries no tokenizer (written before checkpoints carried one); pass "
                             f"--tokenizer with the prepared dataset directory it was trained on, its tokenizer.json, "
                             f"or 'bytes' for the built-in byte corpus")
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.model.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, cfg, tok, str(path))

    # -- the recurrent interface ---------------------------------------------------------------------
    def check_length(self, n: int, what: str = "the prompt") -> None:
        if self.max_len is not None and n > self.max_len:
            raise ValueError(f"{what} needs {n} positions but {self.config.model.family} attends over at most "
                             f"model.max_seq_len={self.max_len}; shorten the prompt or lower --max-new-tokens "
                             f"(recurrent families have no such limit)")

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None):
        """``tokens (B, T)`` right-padded (row b real up to ``lengths[b]``, default T) -> ``(logits (B, T, V),
        state)``. ``doc_ids (B, T)``: documents inside the prompts (a new value starts one), as in
        training; the state then continues each row's last document."""
        tokens = tokens.to(self.device)
        B, T = tokens.shape
        lengths = torch.full((B,), T, dtype=torch.long) if lengths is None else lengths.to(torch.long)
        lengths = lengths.to(self.device)
        if doc_ids is None or not bool((doc_ids[:, 1:] != doc_ids[:, :-1]).any()):
            self.check_length(int(lengths.max()))
            return decode.prefill(self.model, tokens, lengths)
        doc_ids = doc_ids.to(self.device)
        logits = self.model(tokens, doc_ids)              # the packed path of training
        starts = torch.zeros_like(lengths)
        for b in range(B):
            real = doc_ids[b, :int(lengths[b])]
            new = (real[1:] != real[:-1]).nonzero()
            starts[b] = int(new[-1]) + 1 if len(new) else 0
        last = torch.zeros_like(tokens)
        for b in range(B):
            s, e = int(starts[b]), int(lengths[b])
            last[b, :e - s] = tokens[b, s:e]
        self.check_length(int((lengths - starts).max()))
        _, state = decode.prefill(self.model, last, lengths - starts)
        state.lengths = lengths.clone()
        return logits, state

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: decode.DecodeState, new_doc: Optional[torch.Tensor] = None):
        """``tokens (B,)`` -> ``(logits (B, V), state)``. The state is consumed (KV caches are written in
        place); ``new_doc (B,)`` bool: this token starts a new document in that row."""
        return decode.step(self.model, tokens.to(self.device), state,
                           None if new_doc is None else new_doc.to(self.device))

    # -- text ----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Union[str, Sequence[int]]) -> List[int]:
        """A document as training saw one: BOS, then the text's tokens (ids are taken as they are)."""
        if isinstance(prompt, str):
            return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        return list(prompt)

    def allowed(self, V: int) -> torch.Tensor:
        """Ids the sampler may pick: the tokenizer's real tokens (the model's vocabulary may be larger)."""
        ok = torch.zeros(V, dtype=torch.bool, device=self.device)
        ok[:self.tokenizer.vocab_size] = True
        ok[self.tokenizer.pad_id] = False
        ok[self.tokenizer.bos_id] = False
        return ok

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stream: Optional[Callable[[int, str], None]] = None, stop_at_eos: bool = True) -> Generation:
        """Sample a continuation of every prompt. ``stream(row, text)`` gets each new piece of text as
        soon as it decodes to whole characters."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids = [self.encode_prompt(p) for p in prompts]
        if not ids or min(len(x) for x in ids) == 0:
            raise ValueError("every prompt needs at least one token")
        longest = max(len(x) for x in ids)
        self.check_length(longest + max_new_tokens, f"a prompt of {longest} tokens + {max_new_tokens} new tokens")
        B = len(ids)
        tokens = torch.full((B, longest), self.tokenizer.pad_id, dtype=torch.long)
        for b, x in enumerate(ids):
            tokens[b, :len(x)] = torch.tensor(x)
        lengths = torch.tensor([len(x) for x in ids])
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        logits, state = self.prefill(tokens, lengths)
        rows = torch.arange(B, device=self.device)
        nxt = logits[rows, lengths.to(self.device) - 1]
        t1 = time.perf_counter()
        allowed = self.allowed(nxt.shape[-1])
        out: List[List[int]] = [[] for _ in range(B)]
        shown = [""] * B
        done = torch.zeros(B, dtype=torch.bool)
        steps = 0
        for i in range(max_new_tokens):
            tok = sample(nxt.masked_fill(~allowed, float("-inf")), temperature, top_k, top_p, gen)
            for b in range(B):
                if done[b]:
                    continue
                out[b].append(int(tok[b]))
                if stop_at_eos and int(tok[b]) == self.tokenizer.eos_id:
                    done[b] = True
                if stream is not None:
                    text = self.tokenizer.decode(out[b])
                    if not text.endswith("\ufffd") and len(text) > len(shown[b]):
                        stream(b, text[len(shown[b]):])
                        shown[b] = text
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            nxt, state = self.step(tok, state)
            steps += 1
        t2 = time.perf_counter()
        texts = [self.tokenizer.decode(o) for o in out]
        if stream is not None:
            for b in range(B):
                if len(texts[b]) > len(shown[b]):
                    stream(b, texts[b][len(shown[b]):])
        return Generation(texts, out, [len(x) for x in ids], t1 - t0, t2 - t1, sum(len(o) for o in out),
                          state.nbytes_per_sequence())
