"""Per-rank memory of a training step, from the model's shapes (nothing allocated).

:func:`parameters_per_rank` counts what each rank of a TP x PP x DP layout holds: the model is built
once on the meta device, every parameter's split comes from the same
:func:`~nl_pretrain.parallel.tensor.shard_plan` the real run uses, and the pipeline stage of every
parameter from the layer list of :mod:`nl_pretrain.parallel.pipeline` (embedding on the first
stage, tied head also on the last, final norm and untied head on the last).
"""
from __future__ import annotations

import functools
import json
from typing import Dict, List, Tuple

import torch

from nl_pretrain.parallel.topology import Layout

GIB = 1024 ** 3


@functools.lru_cache(maxsize=32)
def _parameter_table(model_json: str) -> Tuple[Tuple[str, int, bool], ...]:
    """``(name, numel, tensor-parallel split?)`` of every parameter of the model (meta device)."""
    from nl_pretrain.config import ModelConfig, CMSLevel
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.tensor import shard_plan
    tree = json.loads(model_json)
    tree["cms"] = [CMSLevel(**lvl) for lvl in tree["cms"]]
    with torch.device("meta"):
        model = LanguageModel(ModelConfig(**tree))
    plan = shard_plan(model)
    return tuple((name, p.numel(), name in plan) for name, p in model.named_parameters())


def parameter_table(model_cfg) -> Tuple[Tuple[str, int, bool], ...]:
    import dataclasses
    return _parameter_table(json.dumps(dataclasses.asdict(model_cfg), sort_keys=True))


def parameter_stages(name: str, pp: int, n_layers: int, tied: bool) -> List[int]:
    """The pipeline stages that hold parameter ``name`` (a tied embedding: the first and the last)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return [int(parts[1]) // (n_layers // pp)]
    if parts[0] == "embed":
        return sorted({0, pp - 1}) if tied else [0]
    return [pp - 1]                                    # final norm, untied lm head


def stage_parameter_counts(model_cfg, tp: int, pp: int) -> Dict[int, int]:
    """``{pipeline stage: parameters one tensor-parallel rank of that stage holds}`` (every tensor-
    parallel split is even, so all TP ranks of a stage hold the same count)."""
    counts = {s: 0 for s in range(pp)}
    for name, numel, split in parameter_table(model_cfg):
        local = numel // tp if split else numel
        for s in parameter_stages(name, pp, model_cfg.n_layers, model_cfg.tie_embeddings):
            counts[s] += local
    return counts


def parameters_per_rank(model_cfg, tp: int, pp: int, dp: int = 1) -> Dict[int, int]:
    """``{global rank: parameters it holds}`` under tensor ``tp`` x pipeline ``pp`` x data ``dp``
    (rank order of :class:`~nl_pretrain.parallel.topology.Layout`: tensor fastest, then data, then
    pipeline). Counts are before ZeRO-3 partitioning (which divides them by ``dp``)."""
    stages = stage_parameter_counts(model_cfg, tp, pp)
    layout = Layout(tp, pp, dp, 0, 1, 1)
    return {r: stages[layout.coords(r)[2]] for r in range(layout.world)}


# -- activations: what autograd keeps, traced on fake tensors -----------------------------------------
ATTENTION_FAMILIES = ("transformer", "hope_attention")
# optimizer state bytes per parameter (fp32), measured by bench/optim.py on hope-tiny (AdamW: two moments;
# the matrix optimizers keep one momentum for matrices and AdamW moments for the vectors)
OPTIMIZER_BYTES = {"adamw": 8.0, "muon": 6.0, "m3": 14.0, "delta_momentum": 6.0, "dmgd": 5.0}


def _state_shapes(m, tp: int) -> set:
    dh = m.d_model // m.n_heads
    hid = max(1, int(round(m.memory_expansion * dh)))
    shapes = {(dh, dh), (hid, dh), (dh, hid), (2 * dh + 2, dh), (1, dh), (1, hid)}
    for lvl in m.cms:
        if lvl.kind == "context":
            h = max(1, int(round(lvl.expansion * dh)))
            shapes |= {(dh, h), (h, dh)}
    return shapes


def _probe_length(m, seq_len: int) -> int:
    """A length whose saved bytes scale linearly to ``seq_len``: two alignments of every chunk size
    (each chunk's work depends on its own tokens only), or ``seq_len`` if shorter."""
    import math
    sizes = [m.chunk_mem, m.chunk_proj] + [l.period for l in m.cms if l.kind == "context"]
    lcm = 1
    for s in sizes:
        lcm = lcm * s // math.gcd(lcm, s)
    probe = 2 * max(lcm, m.conv_kernel) if m.family not in ATTENTION_FAMILIES else 256
    return seq_len if seq_len <= probe or seq_len % probe else probe


@functools.lru_cache(maxsize=64)
def _trace(model_json: str, tp: int, seq_len: int, bf16: bool, recompute_chunks: bool) -> Dict[str, float]:
    """Bytes autograd saves for one sequence through one block (by kind) and through the head."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from nl_pretrain.config import CMSLevel, ModelConfig
    from nl_pretrain.model import LanguageModel
    tree = json.loads(model_json)
    tree["cms"] = [CMSLevel(**lvl) for lvl in tree["cms"]]
    tree.update(n_layers=1, memory_impl="torch")
    if "recompute_chunks" in tree:
        tree["recompute_chunks"] = recompute_chunks
    m = ModelConfig(**tree)
    T = _probe_length(m, seq_len)
    scale = seq_len / T
    with torch.device("meta"):
        model = LanguageModel(m)
    if tp > 1:
        _narrow_to_rank(model, tp)
    shapes = _state_shapes(m, tp)
    chunks = {(c, c) for c in (m.chunk_mem, m.chunk_proj, *[l.period for l in m.cms if l.kind == "context"])}
    out = {"per_token": 0.0, "fast_weight_states": 0.0, "intra_chunk": 0.0, "head": 0.0, "logits": 0.0}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        seen: Dict[int, Tuple[str, int]] = {}
        where = ["block"]

        def pack(t):
            st = t.untyped_storage()
            key = st._cdata
            if key in params or key in seen:
                return t
            if where[0] == "head":
                kind = "logits" if t.dim() >= 2 and t.shape[-1] in (m.vocab_size, m.vocab_size // tp) else "head"
            elif t.dim() >= 3 and tuple(t.shape[-2:]) in chunks:
                kind = "intra_chunk"
            elif t.dim() >= 3 and tuple(t.shape[-2:]) in shapes and t.shape[-2] * t.shape[-1] > m.d_model // m.n_heads:
                kind = "fast_weight_states"
            else:
                kind = "per_token"
            seen[key] = (kind, st.nbytes())
            return t

        ids = torch.zeros(1, T, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x = model.embed(ids).detach().requires_grad_(True)
            y = model.blocks[0](x)
            where[0] = "head"
            logits = model.logits(model.norm(y.detach().requires_grad_(True)))
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
        for kind, n in seen.values():
            out[kind] += n
    return {k: v * scale for k, v in out.items()}


def _narrow_to_rank(model, tp: int) -> None:
    """Replace every tensor-parallel parameter (meta) by its ``1/tp`` slice, so the traced block is
    what one tensor-parallel rank runs (modules read their local head count from these shapes)."""
    from nl_pretrain.model.sharding import HEAD_SLICE
    from nl_pretrain.parallel.tensor import module_plan, shard_plan
    for path, style in module_plan(model).items():
        if style == HEAD_SLICE:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _FirstSlice(tp))
    plan = shard_plan(model)
    for name, (style, dim) in plan.items():
        owner = model
        *path, leaf = name.split(".")
        for part in path:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        p = getattr(owner, leaf) if not leaf.isdigit() else owner[int(leaf)]
        shape = list(p.shape)
        shape[dim] //= tp
        new = torch.nn.Parameter(torch.empty(shape, device="meta"), requires_grad=p.requires_grad)
        if leaf.isdigit():
            owner[int(leaf)] = new
        else:
            setattr(owner, leaf, new)


class _FirstSlice(torch.nn.Module):
    """The first ``1/tp`` of the last dimension: a tensor-parallel rank's head slice (for tracing)."""

    def __init__(self, tp: int):
        super().__init__()
        self.tp = tp

    def forward(self, z):
        return z[..., : z.shape[-1] // self.tp].contiguous()


def activation_profile(model_cfg, tp: int, seq_len: int, bf16: bool = False) -> Dict[str, float]:
    """Bytes autograd keeps for ONE sequence of ``seq_len`` tokens on one tensor-parallel rank:
    ``per_token``, ``fast_weight_states`` (chunk-start states and momenta), ``intra_chunk`` (C x C
    decay / Gram / inverse matrices) of one block; ``head`` (final norm, head input) and ``logits``
    (the loss's fp32 log-probabilities) once. Traced with tp = 1 and tp = 2 and extended as
    ``a + b / tp`` (every saved tensor is either replicated over TP or split by it)."""
    import dataclasses
    j = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    rec = bool(getattr(model_cfg, "recompute_chunks", False))
    one = _trace(j, 1, seq_len, bf16, rec)
    if tp == 1:
        return dict(one)
    if model_cfg.n_heads % 2 or model_cfg.vocab_size % 2:
        return dict(_trace(j, tp, seq_len, bf16, rec))
    two = _trace(j, 2, seq_len, bf16, rec)
    return {k: (2 * two[k] - one[k]) + 2 * (one[k] - two[k]) / tp for k in one}


def estimate(cfg, layout: Layout, stage: int = 0, seq_len: int = 0, packing: float = 1.0) -> Dict[str, float]:
    """Peak bytes of one rank of pipeline stage ``stage`` during a training step.

    - weights, gradients: fp32 (4 B each), or bf16 (2 B) with ``train.precision=bf16``; ZeRO-3
      partitions the weights over DP, ZeRO-2 and -3 the gradients;
    - optimizer: its state (:data:`OPTIMIZER_BYTES`) plus, in bf16, the fp32 master copy (4 B);
      partitioned over DP from ZeRO-1 on;
    - activations: what autograd keeps per block (:func:`activation_profile`) times the stage's
      blocks, times the micro-batch, times the pipeline micro-batches in flight on this stage
      (1F1B: ``min(pp - stage, grad_accum)``); with activation checkpointing each block keeps only
      its input and one block at a time is recomputed; plus the head and the fp32 logits on the last
      stage. ``packing``: the packed-document blow-up of the sequence length (re-laid documents;
      1 + (alignment - 1) / mean document length on average);
    - transient: the backward's largest temporaries on the last stage: the gradients of the fp32
      log-probabilities and of the logits, alive together in the softmax's backward (2 x logits).
    """
    m, t = cfg.model, cfg.train
    T = int(round((seq_len or cfg.data.seq_len) * packing))
    bf16 = t.precision == "bf16"
    w = 2 if bf16 else 4
    dp, z = layout.dp, layout.zero_stage
    params = stage_parameter_counts(m, layout.tp, layout.pp)[stage]
    opt = OPTIMIZER_BYTES.get(cfg.optim.name, 8.0) + (4 if bf16 else 0)
    prof = activation_profile(m, layout.tp, T, bf16)
    block = prof["per_token"] + prof["fast_weight_states"] + prof["intra_chunk"]
    layers = m.n_layers // layout.pp
    in_flight = min(layout.pp - stage, layout.grad_accum) if layout.pp > 1 else 1
    B = layout.micro_batch
    if cfg.parallel.activation_checkpointing:
        kept = layers * T * m.d_model * w * B * in_flight + block * B
    else:
        kept = layers * block * B * in_flight
    last = stage == layout.pp - 1
    head = (prof["head"] + prof["logits"]) * B if last else 0.0
    out = {"weights": params * w / (dp if z >= 3 else 1),
           "grads": params * w / (dp if z >= 2 else 1),
           "optimizer": params * opt / (dp if z >= 1 else 1),
           "activations": kept,
           "fast_weight_states": prof["fast_weight_states"] * B * (1 if cfg.parallel.activation_checkpointing
                                                                      else layers * in_flight),
           "intra_chunk": prof["intra_chunk"] * B * (1 if cfg.parallel.activation_checkpointing
                                                       else layers * in_flight),
           "logits": head,
           "transient": 2 * prof["logits"] * B if last else 0.0}
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + kept + head + out["transient"]
    return out


# -- measurement ----------------------------------------------------------------------------------------
class LiveBytes:
    """Peak bytes of tensor storage alive inside ``with`` (CPU or any device), measured exactly: a
    dispatch mode sees every storage an operator creates, a weak reference sees it freed. Storages
    that existed before (weights, optimizer state) are not counted: add them (:func:`held_bytes`)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self.live: Dict[int, int] = {}
        self.current = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        import weakref
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= n

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def held_bytes(*roots) -> int:
    """Bytes of the distinct storages of every tensor found in ``roots`` (modules, optimizers, dicts,
    lists, tensors), counted once each."""
    seen: Dict[int, int] = {}

    def visit(x):
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            if x.grad is not None:
                visit(x.grad)
        elif isinstance(x, torch.nn.Module):
            for p in x.parameters():
                visit(p)
            for b in x.buffers():
                visit(b)
        elif isinstance(x, torch.optim.Optimizer):
            for state in x.state.values():
                visit(state)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
    for r in roots:
        visit(r)
    return sum(seen.values())
