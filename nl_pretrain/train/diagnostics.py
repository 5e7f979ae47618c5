"""Where a non-finite step came from: a diagnostic re-run of the failing batch (docs/MODEL.md, "Stability").

Nothing here runs on a finite step. When a step's loss (or gradient) is not finite, the training
loop calls :func:`explain`, which runs the same micro-batch again on the unchanged weights (a
non-finite step changes nothing) with observers attached, and names the first quantity, in
execution order, that stopped being finite:

1. the parameters themselves (a weight that is already inf/NaN);
2. forward, in the order the model computes them: every module's output (forward hooks), and
   inside every fast-weight memory call its inputs (keys, values/targets, eta, alpha, queries),
   its final state and momentum (the state norm) and its reads; then the logits and the loss;
3. if the whole forward is finite, the backward: the first of those quantities, walking back
   from the loss, whose gradient is non-finite.

The memory calls are observed by wrapping the memory operators the model modules call
(:func:`kernels.memory.memory_sequence`, ``projection_sequence``, ``memory_chunk``) for the
duration of the re-run only; the model code is unchanged.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import List, Optional

import torch

# module globals of the model code that name a memory operator (patched only during a re-run)
_OPERATOR_SITES = (("nl_pretrain.model.smt", "memory_sequence"), ("nl_pretrain.model.smt", "projection_sequence"),
                   ("nl_pretrain.model.smt", "memory_chunk"), ("nl_pretrain.model.cms", "memory_sequence"))
_MEMORY_NAMES = {"nl_pretrain.model.smt": "main memory", "nl_pretrain.model.cms": "context memory"}


def _max_abs(t: torch.Tensor) -> float:
    t = t.detach()
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        return math.inf
    return float(t.abs().max())


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class _Recorder:
    """Quantities in the order they were computed: ``(where, what, max |x| or inf)``."""

    def __init__(self):
        self.rows: List[tuple] = []
        self.stack: List[str] = []              # the modules running now (innermost last)
        self.modules: List[torch.nn.Module] = []
        self.chunk_calls: List[int] = []        # memory_chunk calls so far in each running module
        self.backward_bad: List[str] = []       # quantities whose gradient was non-finite, backward order

    @property
    def where(self) -> str:
        return self.stack[-1] if self.stack else "model"

    def note(self, what: str, t, where: Optional[str] = None) -> None:
        if isinstance(t, (tuple, list)):
            for i, x in enumerate(t):
                self.note(f"{what}[{i}]" if len(t) > 1 else what, x, where)
            return
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        label = (where or self.where, what)
        # no tensor is kept: a row holding one would close a cycle (tensor -> its hook -> recorder ->
        # row -> tensor) through autograd's C++ graph, which the garbage collector cannot see, and
        # every diagnosis would leak its forward's activations
        self.rows.append((*label, _max_abs(t)))
        if t.requires_grad:
            t.register_hook(lambda g, label=label: self._grad(label, g))

    def _grad(self, label, g):
        if g is not None and not bool(torch.isfinite(g).all()):
            self.backward_bad.append(f"{label[0]} {label[1]}")

    def first_bad(self):
        for i, row in enumerate(self.rows):
            if not math.isfinite(row[2]):
                return i, row
        return None, None


def _state_norm(state) -> torch.Tensor:
    """Largest per-row norm over the weights of a memory state (one tensor, inf when any is)."""
    # in float64: a large but finite fp32 state must not read as inf through its norm's squares
    norms = [w.detach().double().flatten(1).norm(dim=1).max() for w in state if isinstance(w, torch.Tensor)]
    return torch.stack(norms).max() if norms else torch.zeros(())


def _chunk_memory_name(rec: _Recorder) -> str:
    """Which projection memory a ``memory_chunk`` call writes: the chunk loop of
    ``SelfModifyingTitans._projection_pass`` writes ``proj_memories`` in order, once per chunk."""
    memories = getattr(rec.modules[-1], "proj_memories", None) if rec.modules else None
    if not memories:
        return "projection memory (chunk)"
    i = rec.chunk_calls[-1]
    rec.chunk_calls[-1] += 1
    return f"projection memory {memories[i % len(memories)]} (chunk {i // len(memories)})"


def _wrap(fn, rec: _Recorder, memory: str, operator: str):
    def observed(*args, **kw):
        if operator == "projection_sequence":           # (spec, P, S, u, ...)
            rec.note("projection memories input u", args[3])
            (k, v, eta, alpha), P, S = out = fn(*args, **kw)
            for what, t in (("k", k), ("v", v), ("eta", eta), ("alpha", alpha)):
                rec.note(what, t)
            rec.note("projection memories state norm", _state_norm((P,)))
            if S is not None:
                rec.note("projection memories momentum norm", _state_norm((S,)))
            return out
        # memory_sequence / memory_chunk: (spec, state, mom, k, vhat, eta, alpha, beta, q, ...)
        name = memory if operator == "memory_sequence" else _chunk_memory_name(rec)
        for what, t in zip(("k", "v", "eta", "alpha", "beta", "q"), args[3:9]):
            if t is not None:
                rec.note(f"{name} input {what}", t)
        reads, state, mom = out = fn(*args, **kw)
        rec.note(f"{name} state norm", _state_norm(state))
        if mom is not None:
            rec.note(f"{name} momentum norm", _state_norm(mom))
        if reads is not None:
            rec.note(f"{name} reads", reads)
        return out
    return observed


@contextlib.contextmanager
def _observing(model: torch.nn.Module, rec: _Recorder):
    import importlib
    patched, handles = [], []
    for mod_name, attr in _OPERATOR_SITES:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, attr):
            orig = getattr(mod, attr)
            patched.append((mod, attr, orig))
            setattr(mod, attr, _wrap(orig, rec, _MEMORY_NAMES[mod_name], attr))
    for name, sub in model.named_modules():
        if not name:
            continue

        def pre(m, args, name=name):
            rec.stack.append(name)
            rec.modules.append(m)
            rec.chunk_calls.append(0)

        def post(m, args, output, name=name):
            rec.stack.pop()
            rec.modules.pop()
            rec.chunk_calls.pop()
            rec.note("output", output, where=name)
        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, attr, orig in patched:
            setattr(mod, attr, orig)


def diagnose(model: torch.nn.Module, batch: dict, device=None, autocast=None, gradients: bool = True) -> str:
    """One line naming the first non-finite quantity of ``model`` on ``batch`` (see the module doc).
    ``gradients=False``: the forward only (a data-parallel rank: a backward would enter the engine's
    gradient hooks)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return f"first non-finite value: parameter {name} (the weights were already non-finite before this step)"
    device = device or next(model.parameters()).device
    ids, labels, docs = (batch[k].to(device) for k in ("input_ids", "labels", "doc_ids"))
    rec = _Recorder()
    was_training = model.training
    model.train()
    try:
        grad = contextlib.nullcontext() if gradients else torch.no_grad()
        with _observing(model, rec), (autocast or contextlib.nullcontext()), grad:
            logits = model(ids, docs)
        rec.note("logits", logits, where="lm head")
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        rec.note("loss", loss, where="loss")
        i, bad = rec.first_bad()
        if bad is None and gradients and loss.requires_grad:
            loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    if bad is not None:
        before = rec.rows[:i]
        largest = max(before, key=lambda r: r[2]) if before else None
        tail = (f"; largest finite value before it: {largest[0]} {largest[1]} max |x| {_fmt(largest[2])}"
                if largest is not None else "")
        # a memory's state/reads: name its inputs too (eta, alpha, |v| are what a user can act on)
        memory = re.split(r" (?:input|state|momentum|reads)\b", bad[1])[0]
        inputs = {}                   # the failing call's inputs: a chunk loop calls the operator many times
        for r in before:
            if r[0] == bad[0] and r[1].startswith(memory + " input "):
                inputs[r[1].rsplit(" ", 1)[-1]] = _fmt(r[2])
        if inputs and " input " not in bad[1]:
            tail += f"; its inputs' max |x|: {', '.join(f'{n} {v}' for n, v in inputs.items())}"
        return f"first non-finite value: {bad[0]} {bad[1]}{tail}"
    if not gradients:
        return (f"forward finite (loss {_fmt(float(loss))}); gradients are not re-checked in a data-parallel run "
                "(a finite loss with a non-finite gradient: resume the checkpoint in one process to locate it)")
    if rec.backward_bad:
        return (f"forward finite (loss {_fmt(float(loss))}); first non-finite gradient, walking back from the loss: "
                f"{rec.backward_bad[0]}")
    return "the re-run of this batch is finite (the non-finite value did not reproduce)"


def explain(module, micro_batches) -> Optional[str]:
    """:func:`diagnose` on the first micro-batch that shows the non-finite value.

    One process: forward and backward. A data-parallel run (no tensor or pipeline split, ZeRO stage
    0-2, so every rank holds the whole model): every rank re-runs its own micro-batches forward only
    and the ranks exchange their lines (collective: every rank is here, the step's non-finiteness is
    agreed), so every rank returns the same line, naming the rank whose batch shows it. Layouts that
    split the model over processes get a line that says why there is no diagnosis."""
    model = getattr(module, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    if getattr(module, "world", 1) == 1:
        autocast = module._autocast if hasattr(module, "_autocast") else None
        return _first_line(model, micro_batches, module.device, autocast, True)
    layout = getattr(module, "layout", None)
    if layout is None or layout.tp > 1 or layout.pp > 1 or layout.zero_stage >= 3:
        what = (f"tensor {layout.tp} x pipeline {layout.pp}, ZeRO stage {layout.zero_stage}" if layout is not None
                else "a distributed layout")
        return (f"no diagnosis: the model is split over processes ({what}); resume the latest checkpoint in "
                f"one process (or data parallel with ZeRO stage <= 2) to have the failing batch named")
    import torch.distributed as dist
    autocast = ((lambda: torch.autocast(module.device.type, dtype=torch.bfloat16)) if getattr(module, "bf16", False)
                else None)
    line = _first_line(model, micro_batches, module.device, autocast, False)
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    for rank, got in enumerate(lines):
        if got.startswith("first non-finite value"):
            return f"{got} (data-parallel rank {rank}'s micro-batch)"
    return lines[0]


def _first_line(model, micro_batches, device, autocast, gradients) -> Optional[str]:
    """``autocast``: None or a function returning a fresh autocast context per re-run."""
    line = None
    for b in micro_batches:               # the first micro-batch that shows it
        line = diagnose(model, b, device, autocast() if autocast else None, gradients)
        if not line.startswith("the re-run"):
            break
    return line
