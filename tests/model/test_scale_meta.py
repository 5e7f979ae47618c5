"""hope-3b and hope-7b checked without the hardware: per-rank parameter counts under TP8 x PP4 on the
meta device (nothing allocated), and one 7B-width HOPE layer forward + backward on the CPU.

The per-rank counts are what a rank materialises (nl_pretrain/parallel/materialize.py: its stage's
modules; nl_pretrain/parallel/tensor.py: shard_plan slices), checked against a closed form written
from the preset's dimensions, the dry run's per-stage counts and the planner's (``nl-pretrain plan``).
"""
import pytest
import torch

from nl_pretrain.config import build_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.parallel import plan
from nl_pretrain.parallel.dryrun import stage_parameters
from nl_pretrain.parallel.materialize import held_roots, holds, materialize_held
from nl_pretrain.parallel.tensor import shard_plan
from nl_pretrain.parallel.topology import check_layout, stage_layers

TP, PP = 8, 4


def rank_counts(model, cfg, tp: int, pp: int) -> dict:
    """``{pipeline stage: parameters one tensor rank of it materialises}`` of a meta-device model."""
    plan = shard_plan(model)
    out = {}
    for stage in range(pp):
        keep = holds(held_roots(model, pp, stage, list(stage_layers(cfg.model.n_layers, pp, stage))))
        out[stage] = sum(p.numel() // tp if n in plan else p.numel() for n, p in model.named_parameters() if keep(n))
    assert all(p.is_meta for p in model.parameters())
    return out


def closed_form(m, tp: int, pp: int) -> dict:
    """The same counts from the HOPE layer's definition (docs/MODEL.md), by hand."""
    d, H, V, K = m.d_model, m.n_heads, m.vocab_size, m.conv_kernel
    dh = d // H
    hid = round(m.memory_expansion * dh)
    smt = (4 * d * d                           # w_q, w_u, w_g, w_o
           + 2 * d * K                         # conv_q, conv_u
           + 2 * H * dh * dh + 2 * H * dh      # projection memories k, v (dh x dh) and eta, alpha (1 x dh)
           + 2 * H                             # eta / alpha biases
           + 2 * H * dh * hid                  # main MLP memory
           + 5 * H + H * dh)                   # momentum logits, output norm
    cms = 0
    for lvl in m.cms:
        if lvl.kind == "context":
            h2 = round(lvl.expansion * dh)
            cms += 2 * H * dh * h2 + 2 * d * d + 2 * (d * H + H) + H
        else:
            cms += 3 * d * round(lvl.expansion * d)
    replicated_per_block = d * (1 + len(m.cms))          # the block's RMSNorms
    block = (smt + cms) // tp + replicated_per_block
    per_stage = m.n_layers // pp
    counts = {s: per_stage * block for s in range(pp)}
    counts[0] += V * d // tp                              # embedding rows
    counts[pp - 1] += d + V * d // tp                     # final norm, untied head columns
    return counts


@pytest.mark.parametrize("preset", ["hope-3b", "hope-7b"])
def test_per_rank_parameters_under_tp8_pp4(preset):
    cfg = build_config({"model": {"preset": preset}, "data": {"seq_len": 4096},
                        "train": {"micro_batch_size": 1, "grad_accum": 8},
                        "parallel": {"tensor": TP, "pipeline": PP}})
    check_layout(cfg, TP * PP * 2)                        # the layout is valid (64 GPUs: DP 2)
    assert not cfg.model.tie_embeddings
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    counts = rank_counts(model, cfg, TP, PP)
    assert counts == closed_form(cfg.model, TP, PP)
    layout = check_layout(cfg, TP * PP)
    assert counts == stage_parameters(cfg, layout)
    assert counts == plan.rank_parameters(cfg, layout)       # the planner (nl-pretrain plan)
    total = sum(p.numel() for p in model.parameters())
    # the shards cover the model: TP ranks x stages (minus the replicated norms counted TP times)
    assert TP * sum(counts.values()) > total > sum(counts.values())
    # no stage holds more than 1/PP of the model by more than the embedding/head rows
    assert max(counts.values()) < total / (TP * PP) + cfg.model.vocab_size * cfg.model.d_model / TP


def test_one_7b_width_hope_layer_forward_backward_on_cpu():
    """One block at d=4096, 32 heads (hope-7b), 32 tokens in 4 memory chunks, float32: materialised
    from the meta model alone (the embedding and head stay on the meta device), forward and backward
    finite, every parameter reached by the gradient."""
    cfg = build_config({"model": {"preset": "hope-7b", "n_layers": 1, "chunk_mem": 8, "chunk_proj": 8},
                        "data": {"seq_len": 32}})
    with torch.device("meta"):
        model = LanguageModel(cfg.model, seed=0)
    materialize_held(model, ["blocks.0"], torch.device("cpu"))
    block = model.blocks[0]
    assert model.embed.weight.is_meta and model.lm_head.weight.is_meta
    n = sum(p.numel() for p in block.parameters())
    assert n > 190e6, n                                           # a 7B-width block: ~205M parameters
    x = torch.randn(1, 32, cfg.model.d_model, generator=torch.Generator().manual_seed(0))
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) == len(grads)
