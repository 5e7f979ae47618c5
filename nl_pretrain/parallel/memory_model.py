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
    """The short length traced for ``seq_len`` (with twice it; :func:`_trace_block`): two alignments
    of every chunk size (each chunk's work depends on its own tokens only), or ``seq_len`` itself."""
    import math
    sizes = [m.chunk_mem, m.chunk_proj] + [l.period for l in m.cms if l.kind == "context"]
    lcm = 1
    for s in sizes:
        lcm = lcm * s // math.gcd(lcm, s)
    probe = 2 * max(lcm, m.conv_kernel) if m.family not in ATTENTION_FAMILIES else 256
    return seq_len if seq_len <= 2 * probe else probe


class _SavesLikeTriton(torch.autograd.Function):
    """Stands for a whole-sequence Triton kernel while tracing: outputs of the kernel's shapes, and
    for the backward exactly what the kernel's autograd function saves (given as ``saved``)."""

    @staticmethod
    def forward(ctx, shapes, n_saved, *tensors):
        ctx.save_for_backward(*tensors[:n_saved])
        return tuple(torch.empty(s, dtype=torch.float32, device=tensors[0].device) for s in shapes)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + (None,) * len(ctx.saved_tensors)


_STATE_TAG = "_nl_chunk_states"     # marks the stand-ins' state tensors for the trace's classification


def _chunk_states(state, n_chunks: int):
    """The chunk-start states a Triton kernel keeps: ``n_chunks + 1`` copies of every state tensor."""
    return [_tagged(torch.empty(n_chunks + 1, *w.shape, dtype=torch.float32, device=w.device)) for w in state]


def _tagged(t):
    setattr(t, _STATE_TAG, True)
    return t


def _triton_memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets=False,
                            impl="triton", resets=None, recompute=False):
    """What ``triton_sequence`` / ``triton_mlp_sequence`` keep: chunk-start states and momenta plus the
    per-token inputs (linear: ``w = eta vhat``, both gradient coefficients and log alpha)."""
    N, T = k.shape[:2]
    n = -(-T // chunk)
    log_alpha = alpha.float().log()
    if spec.kind == "linear":
        per_token = [k, q, eta.float(), eta.float(), eta[..., None].float() * vhat.float(), log_alpha]
    else:
        per_token = [k, vhat, eta.float(), log_alpha, q]
    saved = _chunk_states(state, n) + (_chunk_states(mom, n) if mom is not None else [])
    saved += [t for t in per_token if t is not None] + ([beta] if beta is not None else [])
    shapes = ([(N, T, vhat.shape[-1])] if q is not None else []) + [tuple(w.shape) for w in state]
    shapes += [tuple(w.shape) for w in mom] if mom is not None else []
    outs = _SavesLikeTriton.apply(tuple(shapes), len(saved), *saved, k)
    reads, outs = (outs[0], outs[1:]) if q is not None else (None, outs)
    return reads, tuple(outs[:len(state)]), (tuple(outs[len(state):]) if mom is not None else None)


def _triton_projection_sequence(spec, P, S, u, beta, eta_bias, alpha_bias, eta_max, chunk, update_eta_scale=1.0,
                                impl="triton", resets=None, recompute=False):
    """What ``triton_projection`` keeps: chunk-start stacked states (and momenta), ``u``, betas, biases."""
    N, R, d = P.shape
    T = u.shape[1]
    n = -(-T // chunk)
    saved = [_tagged(torch.empty(N, n + 1, R, d, device=u.device)) for _ in range(2 if beta is not None else 1)]
    saved += [u, eta_bias.float(), alpha_bias.float()]
    saved += [beta.float().t().contiguous()] if beta is not None else []
    shapes = ((N, T, d), (N, T, d), (N, T), (N, T), (N, R, d), (N, R, d))
    k, v, eta, alpha, Pn, Sn = _SavesLikeTriton.apply(shapes, len(saved), *saved, u)
    return (k, v, eta, alpha), Pn, (Sn if beta is not None else None)


@functools.lru_cache(maxsize=64)
def _trace(model_json: str, tp: int, seq_len: int, bf16: bool, recompute_chunks: bool,
           impl: str = "torch") -> Dict[str, float]:
    """Bytes autograd saves for one sequence through one block (by kind) and through the head.
    ``impl='triton'``: the memory operators are replaced by stand-ins that keep what the Triton
    kernels keep (:class:`_SavesLikeTriton`); everything else is the model's own code."""
    import contextlib
    from unittest import mock
    patches = contextlib.ExitStack()
    if impl == "triton":
        patches.enter_context(mock.patch("nl_pretrain.model.smt.memory_sequence", _triton_memory_sequence))
        patches.enter_context(mock.patch("nl_pretrain.model.smt.projection_sequence", _triton_projection_sequence))
        patches.enter_context(mock.patch("nl_pretrain.model.cms.memory_sequence", _triton_memory_sequence))
    with patches:
        return _trace_block(model_json, tp, seq_len, bf16, recompute_chunks)


def _trace_block(model_json: str, tp: int, seq_len: int, bf16: bool, recompute_chunks: bool) -> Dict[str, float]:
    """:func:`_trace_at` at ``seq_len``, or extended from two probe lengths ``p`` and ``2p`` as
    ``A(T) = A(p) + (A(2p) - A(p)) (T - p) / p``: saved bytes are affine in T (per-token and per-chunk
    terms, plus the one extra state a kernel keeps at the sequence end)."""
    tree = json.loads(model_json)
    from nl_pretrain.config import CMSLevel, ModelConfig
    tree["cms"] = [CMSLevel(**lvl) for lvl in tree["cms"]]
    p = _probe_length(ModelConfig(**tree), seq_len)
    if p == seq_len:
        return _trace_at(model_json, tp, seq_len, bf16, recompute_chunks)
    a = _trace_at(model_json, tp, p, bf16, recompute_chunks)
    b = _trace_at(model_json, tp, 2 * p, bf16, recompute_chunks)
    return {k: a[k] + (b[k] - a[k]) * (seq_len - p) / p for k in a}


def _trace_at(model_json: str, tp: int, T: int, bf16: bool, recompute_chunks: bool) -> Dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from nl_pretrain.config import CMSLevel, ModelConfig
    from nl_pretrain.model import LanguageModel
    tree = json.loads(model_json)
    tree["cms"] = [CMSLevel(**lvl) for lvl in tree["cms"]]
    tree.update(n_layers=1, memory_impl="torch")
    if "recompute_chunks" in tree:
        tree["recompute_chunks"] = recompute_chunks
    m = ModelConfig(**tree)
    with torch.device("meta"):
        model = LanguageModel(m)
    if tp > 1:
        _narrow_to_rank(model, tp)
    shapes = _state_shapes(m, tp)
    chunks = {(c, c) for c in (m.chunk_mem, m.chunk_proj, *[l.period for l in m.cms if l.kind == "context"])}
    out = {"per_token": 0.0, "fast_weight_states": 0.0, "intra_chunk": 0.0, "head": 0.0, "logits": 0.0}
    if bf16:                   # DeepSpeed bf16 holds bf16 weights: autocast then makes no weight copies
        model = model.to(torch.bfloat16)
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
            elif getattr(t, _STATE_TAG, False):
                kind = "fast_weight_states"
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
    return out


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


def activation_profile(model_cfg, tp: int, seq_len: int, bf16: bool = False, impl: str = "torch") -> Dict[str, float]:
    """Bytes autograd keeps for ONE sequence of ``seq_len`` tokens on one tensor-parallel rank:
    ``per_token``, ``fast_weight_states`` (chunk-start states and momenta), ``intra_chunk`` (C x C
    decay / Gram / inverse matrices) of one block; ``head`` (final norm, head input) and ``logits``
    (the loss's fp32 log-probabilities) once. Traced with tp = 1 and tp = 2 and extended as
    ``a + b / tp`` (every saved tensor is either replicated over TP or split by it). ``impl``: the
    memory path, ``torch`` (CPU) or ``triton`` (GPU: chunk-start states and inputs only)."""
    import dataclasses
    j = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    rec = bool(getattr(model_cfg, "recompute_chunks", False))
    one = _trace(j, 1, seq_len, bf16, rec, impl)
    if tp == 1:
        return dict(one)
    if model_cfg.n_heads % 2 or model_cfg.vocab_size % 2:
        return dict(_trace(j, tp, seq_len, bf16, rec, impl))
    two = _trace(j, 2, seq_len, bf16, rec, impl)
    return {k: (2 * two[k] - one[k]) + 2 * (one[k] - two[k]) / tp for k in one}


def memory_path(cfg, device: str = "cuda") -> str:
    """The memory implementation a run of ``cfg`` uses on ``device`` (``torch`` or ``triton``)."""
    impl = cfg.model.memory_impl
    if impl == "auto":
        return "triton" if device == "cuda" else "torch"
    return "triton" if impl == "triton" else "torch"


def estimate(cfg, layout: Layout, stage: int = 0, seq_len: int = 0, packing: float = 1.0,
             device: str = "cuda") -> Dict[str, float]:
    """Peak bytes of one rank of pipeline stage ``stage`` during a training step.

    - weights, gradients: fp32 (4 B each), or bf16 (2 B) with ``train.precision=bf16``; ZeRO-3
      partitions the weights over DP, ZeRO-2 and -3 the gradients;
    - optimizer: its state (:data:`OPTIMIZER_BYTES`) plus, in bf16, the fp32 master copy (4 B);
      partitioned over DP from ZeRO-1 on;
    - activations: what autograd keeps per block (:func:`activation_profile`) times the stage's
      blocks, times the micro-batch, times the pipeline micro-batches in flight on this stage
      (1F1B: ``min(pp - stage, grad_accum)``); with activation checkpointing each block keeps only
      its input, and the peak is the larger of the backward's start (head and logit gradients
      alive) and one block's recompute (its saved tensors); plus the head and the fp32 logits on the last
      stage; the memory path is the one ``device`` runs (:func:`memory_path`). ``packing``: the packed-document blow-up of the sequence length (re-laid documents;
      1 + (alignment - 1) / mean document length on average);
    - zero_buffers: DeepSpeed's ZeRO gradient buckets (:func:`_zero_buffers`); pipe_buffers: the
      last pipeline stage's logits held in DeepSpeed's two pipe buffers;
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
    prof = activation_profile(m, layout.tp, T, bf16, memory_path(cfg, device))
    block = prof["per_token"] + prof["fast_weight_states"] + prof["intra_chunk"]
    layers = m.n_layers // layout.pp
    in_flight = min(layout.pp - stage, layout.grad_accum) if layout.pp > 1 else 1
    B = layout.micro_batch
    last = stage == layout.pp - 1
    head = (prof["head"] + prof["logits"]) * B if last else 0.0
    transient = 2 * prof["logits"] * B if last else 0.0
    # DeepSpeed's pipeline keeps the last stage's outputs (the fp32 logits) in its two pipe buffers until
    # they are overwritten by later micro-batches (it clears them only on the other stages)
    pipe_buffers = 2 * prof["logits"] * B if (last and layout.pp > 1) else 0.0
    if cfg.parallel.activation_checkpointing:
        # the larger of: the start of the backward (block inputs, head, logit gradients) and one block
        # recomputed later (block inputs and that block's saved tensors; the head is freed by then)
        inputs = layers * T * m.d_model * w * B * in_flight
        kept = inputs + max(0.0, block * B - head - transient)
    else:
        kept = layers * block * B * in_flight
    out = {"weights": params * w / (dp if z >= 3 else 1),
           "grads": params * w / (dp if z >= 2 else 1),
           "optimizer": params * opt / (dp if z >= 1 else 1),
           "activations": kept,
           "fast_weight_states": prof["fast_weight_states"] * B * (1 if cfg.parallel.activation_checkpointing
                                                                      else layers * in_flight),
           "intra_chunk": prof["intra_chunk"] * B * (1 if cfg.parallel.activation_checkpointing
                                                       else layers * in_flight),
           "logits": head,
           "transient": transient}
    out["zero_buffers"] = _zero_buffers(cfg, layout) * (2 if bf16 else 4)
    out["pipe_buffers"] = pipe_buffers
    out["total"] = (out["weights"] + out["grads"] + out["optimizer"] + kept + head + out["transient"]
                    + out["zero_buffers"] + pipe_buffers)
    return out


def _zero_buffers(cfg, layout: Layout) -> float:
    """Elements of DeepSpeed's ZeRO gradient buckets, allocated at their configured size whatever the
    model's (``reduce_bucket_size``, 5e8 by default): one under stages 1 and 2, two under stage 3
    (measured by bench/memory.py: +1.9 GB fp32 each on a 1M-parameter model)."""
    if layout.zero_stage == 0:
        return 0.0
    from nl_pretrain.parallel.parallelize import deepspeed_config
    zero = deepspeed_config(cfg, layout)["zero_optimization"]
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    return bucket * (2 if layout.zero_stage == 3 else 1)


# -- measurement ----------------------------------------------------------------------------------------
class LiveBytes:
    """Peak bytes of tensor storage alive inside ``with`` (CPU or any device), measured exactly: a
    dispatch mode sees every storage an operator creates, a weak reference sees it freed. Storages
    that existed before (weights, optimizer state) count once given to :meth:`hold`."""

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

    def hold(self, *roots) -> "LiveBytes":
        """Count the storages of ``roots`` (see :func:`held_bytes`) as live from now on, and their
        release when it happens (a buffer replaced during the step frees its old storage)."""
        import weakref
        for key, st in _storages(roots).items():
            if key not in self.live and st.nbytes():
                self.live[key] = st.nbytes()
                self.current += st.nbytes()
                weakref.finalize(st, self._free, key, st.nbytes())
        self.peak = max(self.peak, self.current)
        return self

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def held_bytes(*roots) -> int:
    """Bytes of the distinct storages of every tensor found in ``roots`` (modules, optimizers, dicts,
    lists, tensors), counted once each."""
    return sum(st.nbytes() for st in _storages(roots).values())


def _storages(roots) -> Dict[int, "torch.UntypedStorage"]:
    seen: Dict[int, torch.UntypedStorage] = {}

    def visit(x):
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            seen[st.data_ptr()] = st
            if x.is_leaf and x.grad is not None:
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
    return seen
