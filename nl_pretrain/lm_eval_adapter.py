"""lm-evaluation-harness on nl-pretrain checkpoints: the ``nl-pretrain`` lm-eval model and the
``nl-pretrain lm-eval`` command (docs/INFERENCE.md, "lm-eval").

Every request runs on the recurrent path of :mod:`nl_pretrain.infer.decode`: the context is
prefilled through the chunk-parallel forward, then the continuation is scored (``loglikelihood``)
or produced (``generate_until``) one token at a time from the carried state; a whole document
(``loglikelihood_rolling``) is one prefill. Rows are batched (``batch_size``) across requests, longest
first (16 rows unless ``--batch_size`` says otherwise); rows of a batch may have different lengths
(prefill takes right-padded prompts). Generation picks only the tokenizer's own tokens. Every
context starts with ``<|bos|>`` as every training document does. Attention families see at most
``model.max_seq_len`` tokens (contexts are cut from the left, documents scored in lm-eval's rolling
windows); attention-free families keep a constant state and take any length whole.

lm-eval 0.4.13 finds models only in its own registry (no entry points), so ``lm_eval --model
nl-pretrain`` does not work: ``nl-pretrain lm-eval`` registers the model and then runs lm-eval's own
command line (``run``) in this process with every option it was given.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval imports them only into an empty registry)

MODEL_NAME = "nl-pretrain"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def load_session(path: str, dtype: torch.dtype, device: str, tokenizer: Optional[str]):
    from nl_pretrain.infer import Session
    return Session.load(path, device=device, dtype=dtype, tokenizer=tokenizer)


def last_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` on the CPU: each row's logits at its last real position (selected on the device)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, lengths.to(logits.device) - 1].cpu()


@register_model(MODEL_NAME)
class NLPretrainLM(LM):
    """``--model_args checkpoint=DIR[,dtype=float32|float64|bfloat16][,add_bos=true][,tokenizer=PATH|bytes]``;
    ``--batch_size N``; ``--device`` (CUDA when available, else the CPU)."""

    def __init__(self, checkpoint: str, dtype: str = "float32", batch_size=16, add_bos=True,
                 max_batch_size=None, device: Optional[str] = None, tokenizer: Optional[str] = None, **unused):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model_args dtype={dtype}: unknown; use one of {', '.join(DTYPES)}")
        # lm-eval's default device is cuda:0; without CUDA the model runs on the CPU
        want = device or "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            want = "cpu"
        self._device = torch.device(want)
        self.session = load_session(str(checkpoint), DTYPES[dtype], want, tokenizer)
        self.tok = self.session.tokenizer
        self.cfg = self.session.config.model
        from nl_pretrain.model.model import ATTENTION_FAMILIES
        self.windowed = self.cfg.family in ATTENTION_FAMILIES
        self.add_bos = str(add_bos).lower() in ("1", "true", "yes")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16   # "auto": 16

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"nl-pretrain-{self.tok.sha256[:16]}"

    def tok_encode(self, text: str) -> List[int]:
        return self.tok.encode(text)

    def _prefix(self) -> List[int]:
        return [self.tok.bos_id] if self.add_bos else []

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """The continuation's tokens are those of ``context + continuation`` past the context's, so a
        merge across the boundary is scored as the whole text tokenises (trailing spaces move over)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        return self._prefix() + ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ the recurrent path
    @torch.no_grad()
    def _score(self, rows: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """``(prefix, target)`` rows -> (sum of log p(target | prefix), target is the greedy one)."""
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        out: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            prefixes, targets = [rows[i][0] for i in idx], [rows[i][1] for i in idx]
            lengths = torch.tensor([len(p) for p in prefixes])
            tokens = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
            for b, p in enumerate(prefixes):
                tokens[b, :len(p)] = torch.tensor(p)
            logits, state = self.session.prefill(tokens, lengths)
            nxt = last_logits(logits, lengths)                                # predicts target[0]
            n = max(len(t) for t in targets)
            tgt = torch.zeros(len(idx), n, dtype=torch.long)
            for b, t in enumerate(targets):
                tgt[b, :len(t)] = torch.tensor(t)
            logp = torch.zeros(len(idx), dtype=torch.float64)
            greedy = torch.ones(len(idx), dtype=torch.bool)
            for j in range(n):
                live = torch.tensor([j < len(t) for t in targets])
                lp = F.log_softmax(nxt.double(), -1)
                logp += torch.where(live, lp.gather(1, tgt[:, j:j + 1])[:, 0], 0.0)
                greedy &= ~live | (nxt.argmax(-1) == tgt[:, j])
                if j + 1 < n:                                              # rows past their end feed padding
                    nxt, state = self.session.step(tgt[:, j], state)
                    nxt = nxt.cpu()
            for b, i in enumerate(idx):
                out[i] = (float(logp[b]), bool(greedy[b]))
        return out

    def _fit(self, prefix: List[int], target: List[int]) -> Tuple[List[int], List[int]]:
        """Attention families: the last ``max_seq_len`` input tokens (the context cut from the left)."""
        if not self.windowed:
            return prefix, target
        L = self.cfg.max_seq_len
        if len(target) > L:
            raise ValueError(f"a continuation of {len(target)} tokens exceeds model.max_seq_len ({L}) of this "
                             f"{self.cfg.family} model; use a task with shorter continuations")
        return prefix[-(L + 1 - len(target)):], target

    # ------------------------------------------------------------------ lm-eval's three requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = req.args
            prefix, target = self._encode_pair(context, continuation)
            if not prefix:                                                   # add_bos=false, empty context
                prefix = [self.tok.bos_id]
            rows.append(self._fit(prefix, target))
        results = self._score(rows)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        results = []
        for req in requests:
            (text,) = req.args
            tokens = self.tok.encode(text)
            if self.windowed:                 # lm-eval's windows: every token predicted once
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.tok.bos_id, max_seq_len=self.cfg.max_seq_len,
                    context_len=1)]
            else:                             # a constant state: the whole document at once
                windows = [([self.tok.bos_id], tokens)] if tokens else []
            total = 0.0
            with torch.no_grad():
                for ctx, pred in windows:
                    full = ctx + pred
                    inp = torch.tensor(full[:-1])[None]
                    logits, _ = self.session.prefill(inp, torch.tensor([inp.shape[1]]))
                    lp = F.log_softmax(logits[0, -len(pred):].cpu().double(), -1)
                    total += float(lp.gather(1, torch.tensor(pred)[:, None]).sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out: List[Optional[str]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            kwargs = [dict(requests[i].args[1] or {}) for i in idx]
            until = [self._until(kw) for kw in kwargs]
            max_new = [int(kw.get("max_gen_toks", 256)) for kw in kwargs]
            prompts = [self._prefix() + self.tok.encode(requests[i].args[0]) or [self.tok.bos_id] for i in idx]
            if self.windowed:                 # room for the new tokens inside max_seq_len
                prompts = [p[-max(1, self.cfg.max_seq_len - m):] for p, m in zip(prompts, max_new)]
                max_new = [min(m, self.cfg.max_seq_len - len(p)) for p, m in zip(prompts, max_new)]
            lengths = torch.tensor([len(p) for p in prompts])
            tokens = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
            for b, p in enumerate(prompts):
                tokens[b, :len(p)] = torch.tensor(p)
            logits, state = self.session.prefill(tokens, lengths)
            allowed = self.session.allowed(logits.shape[-1]).cpu()      # the tokenizer's real tokens only
            nxt = last_logits(logits, lengths)
            made: List[List[int]] = [[] for _ in idx]
            done = [m <= 0 for m in max_new]
            for j in range(max(max_new)):
                pick = self._pick(nxt.masked_fill(~allowed, float("-inf")), kwargs)
                for b in range(len(idx)):
                    if done[b]:
                        continue
                    if int(pick[b]) == self.tok.eos_id:
                        done[b] = True
                        continue
                    made[b].append(int(pick[b]))
                    text = self.tok.decode(made[b])
                    done[b] = len(made[b]) >= max_new[b] or any(u in text for u in until[b])
                if all(done):
                    break
                nxt, state = self.session.step(pick, state)
                nxt = nxt.cpu()
            for b, i in enumerate(idx):
                text = self.tok.decode(made[b])
                for u in until[b]:
                    text = text.split(u)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _until(self, kwargs: dict) -> List[str]:
        until = kwargs.get("until") or []
        return [until] if isinstance(until, str) else list(until)

    def _pick(self, logits: torch.Tensor, kwargs: List[dict]) -> torch.Tensor:
        """Greedy unless a request asks ``do_sample`` with a temperature > 0."""
        picks = logits.argmax(-1)
        for b, kw in enumerate(kwargs):
            temp = float(kw.get("temperature", 0.0) or 0.0)
            if kw.get("do_sample") and temp > 0:
                probs = F.softmax(logits[b].double() / temp, -1)
                picks[b] = torch.multinomial(probs, 1)[0]
        return picks


# ---------------------------------------------------------------------------------- the command
def run_lm_eval(checkpoint: str, lm_eval_args: List[str], tokenizer: Optional[str] = None) -> int:
    """``nl-pretrain lm-eval --checkpoint DIR [lm_eval run options]``: lm-eval's own CLI, in this
    process, with ``--model nl-pretrain --model_args checkpoint=DIR`` (more ``--model_args`` merge in)."""
    if any(a == "--model" or a.startswith("--model=") or a == "-M" for a in lm_eval_args):
        raise ValueError("nl-pretrain lm-eval always evaluates the nl-pretrain model; drop --model "
                         "(model options go in --model_args key=value)")
    if not any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in lm_eval_args):
        raise ValueError("nl-pretrain lm-eval needs --tasks (e.g. --tasks hellaswag, or a task of your own "
                         "with --include_path DIR); `lm-eval ls tasks` lists them")
    from nl_pretrain.hf.export import resolve_source
    resolve_source(checkpoint, tokenizer)       # neither a checkpoint nor an export, no tokenizer: one line
    from lm_eval._cli import HarnessCLI
    batch = [] if any(a.startswith("--batch_size") or a == "-b" for a in lm_eval_args) else ["--batch_size", "16"]
    model_args = f"checkpoint={checkpoint}" + (f",tokenizer={tokenizer}" if tokenizer else "")
    argv = ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", model_args, *batch, *lm_eval_args]
    saved, sys.argv = sys.argv, argv
    try:
        cli = HarnessCLI()
        args = cli.parse_args()
        try:
            cli.execute(args)
        except ValueError as exc:
            if str(exc).startswith("Tasks not found:"):
                names = str(exc).split(":", 1)[1].strip()
                raise ValueError(f"lm-eval task '{names}' not found; `lm-eval ls tasks` lists the known ones, and "
                                 f"a task of your own needs --include_path DIR (the directory of its YAML)") from None
            raise
    finally:
        sys.argv = saved
    return 0
