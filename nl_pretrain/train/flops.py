"""Training FLOPs per token (forward + backward), counting the inner-loop work of the memories.

``6 * N`` for every matmul weight that is not the embedding lookup, plus ``6 * L * T * d`` for causal
attention (QK^T and AV at average length T/2), plus for each fast-weight memory per head and token
a read, a gradient and a write of its state (about ``6 * |state|`` forward, tripled for backward)
and the intra-chunk matmuls (``~4 * C * d_h`` per memory forward). An estimate for MFU, not a count.
"""
from __future__ import annotations

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16


def _memory_state(kind: str, d_in: int, d_out: int, e: float) -> float:
    return d_in * d_out if kind == "linear" else 2 * e * d_in * d_out


def flops_per_token(cfg, n_params: int, seq_len: int) -> float:
    embed = cfg.vocab_size * cfg.d_model
    dense = 6 * (n_params - (embed if cfg.tie_embeddings else 0))
    L, d, H = cfg.n_layers, cfg.d_model, cfg.n_heads
    dh = d // H
    total = dense
    if cfg.family in ("transformer", "hope_attention"):
        total += 6 * L * seq_len * d
    else:
        mems = [(cfg.main_memory, dh, dh, cfg.chunk_mem)]
        if cfg.adaptive_projections:
            mems += [(cfg.proj_memory, dh, o, cfg.chunk_proj) for o in (dh, dh, 1, 1)]
        for kind, din, dout, C in mems:
            total += 3 * H * L * (6 * _memory_state(kind, din, dout, cfg.memory_expansion) + 4 * C * dh)
    for lvl in cfg.cms:
        if lvl.kind == "context":
            total += 3 * H * L * (6 * _memory_state("mlp", dh, dh, lvl.expansion) + 4 * lvl.period * dh)
    return float(total)


def device_peak_tflops(device) -> float:
    import torch
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
