"""Configs, the single-process reference run, and the per-rank functions the parallel tests spawn."""
from __future__ import annotations

import torch

from nl_pretrain.config import build_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import ModelOptimizer, lr_at
from nl_pretrain.train.data import build_data

HOPE_CMS = [{"kind": "context", "period": 4, "expansion": 1.0},
            {"kind": "step", "period": 1, "expansion": 2.0},
            {"kind": "step", "period": 2, "expansion": 2.0}]


def tiny_tree(family="hope", tp=1, pp=1, zero=0, micro=2, accum=1, steps=3, clip=0.0, cms=None, act_ckpt=False,
              **train):
    model = {"preset": f"{family}-tiny", "d_model": 32, "n_heads": 2, "n_layers": 2, "vocab_size": 260,
             "chunk_mem": 4, "chunk_proj": 4, "max_seq_len": 16}
    if family in ("hope", "hope_attention"):
        model["cms"] = cms if cms is not None else HOPE_CMS
    elif cms is not None:
        model["cms"] = cms
    return {"model": model,
            "data": {"seq_len": 16, "max_documents": 12, "val_fraction": 0.0},
            "optim": {"lr": 1e-2, "warmup_steps": 0, "grad_clip": clip},
            "train": {"steps": steps, "micro_batch_size": micro, "grad_accum": accum, "seed": 0,
                      "progress": False, **train},
            "parallel": {"tensor": tp, "pipeline": pp, "zero_stage": zero, "activation_checkpointing": act_ckpt}}


def reference_run(tree, global_micro: int):
    """One process: the same steps with micro-batches of ``global_micro`` (= micro x DP) sequences."""
    cfg = build_config(tree)
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    data = build_data(cfg.data, global_micro, cfg.train.seed).train
    losses = []
    for step in range(cfg.train.steps):
        total = 0.0
        for _ in range(cfg.train.grad_accum):
            b = next(data)
            loss = model.loss(b["input_ids"], b["labels"], b["doc_ids"])
            (loss / cfg.train.grad_accum).backward()
            total += float(loss.detach()) / cfg.train.grad_accum
        opt.step(step, lr_at(step, cfg.optim, cfg.train.steps))
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def local_parameters(trainer) -> dict:
    named = trainer.named_parameters()
    if trainer.layout.zero_stage == 3:
        import deepspeed
        engine_params = [p for _, p in trainer.engine_named]
        with deepspeed.zero.GatheredParameters(engine_params):
            return {n: p.detach().clone() for n, p in named}
    return {n: p.detach().clone() for n, p in named}


def distributed_run(tree, probe=None):
    """Train ``tree`` on this rank; ``probe(trainer)`` (optional) adds what it returns as ``probe``."""
    from megatron.core import parallel_state as ps
    from nl_pretrain.parallel.trainer import DistributedTrainer, rank_batches
    cfg = build_config(tree)
    trainer = DistributedTrainer(cfg)
    data = rank_batches(cfg, trainer.layout, trainer.dp_rank)
    losses = [trainer.train_step(s, [next(data) for _ in range(cfg.train.grad_accum)])
              for s in range(cfg.train.steps)]
    dtypes = {"engine": str(trainer.engine_named[0][1].dtype),
              "slow": sorted({str(p.dtype) for _, p in trainer.slow.named_parameters()})}
    return {"losses": losses, "params": local_parameters(trainer), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "dtypes": dtypes,
            "dp_rank": trainer.dp_rank, "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "slow_comm": list(trainer.slow.comm_log), "probe": probe(trainer) if probe else None}


def assemble(results, reference_params) -> dict:
    """Full parameters from the shards of the DP-rank-0 replicas: tensor-parallel slices concatenated,
    pipeline stages united (a tied embedding lives on the first and the last stage: both must agree)."""
    plan = _plan_for(reference_params)
    full = {}
    for name in reference_params:
        holders = [r for r in results if r["dp_rank"] == 0 and name in r["params"]]
        by_stage = {}
        for r in sorted(holders, key=lambda r: r["tp_rank"]):
            by_stage.setdefault(r["pp_rank"], []).append(r["params"][name])
        assert by_stage, f"{name}: no rank holds it"
        versions = []
        for pieces in by_stage.values():
            versions.append(torch.cat(pieces, plan[name][1]) if name in plan and len(pieces) > 1 else pieces[0])
        for v in versions[1:]:
            torch.testing.assert_close(v, versions[0], rtol=0, atol=1e-6, msg=lambda m: f"{name} differs across stages")
        full[name] = versions[0]
    return full


_PLAN_CACHE = {}


def _plan_for(reference_params):
    return _PLAN_CACHE["plan"]


def set_plan(tree):
    from nl_pretrain.parallel.tensor import shard_plan
    cfg = build_config(tree)
    with torch.device("meta"):
        _PLAN_CACHE["plan"] = shard_plan(LanguageModel(cfg.model))


def distributed_runs(trees):
    """Several layouts in one set of processes (imports cost ~15 s per process on 2 cores)."""
    from megatron.core import parallel_state as ps
    out = []
    for tree in trees:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        out.append(distributed_run(tree))
    return out


def train_runs(trees, env=None):
    """``train_distributed`` (the one loop, ``fit``) for each tree in turn on this rank; the summaries."""
    import os
    from megatron.core import parallel_state as ps
    from nl_pretrain.parallel.trainer import train_distributed
    os.environ.update(env or {})
    out = []
    for tree in trees:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        out.append(train_distributed(build_config(tree)))
    return out


def rng_streams(seed):
    """What the default and the tensor-parallel stream draw on this rank."""
    from nl_pretrain.parallel.random import seed_model_parallel, tensor_parallel_rng
    from nl_pretrain.parallel.topology import init_parallel
    init_parallel(build_config(tiny_tree("transformer", tp=2)))
    seed_model_parallel(seed)
    with tensor_parallel_rng():
        sharded = torch.nn.functional.dropout(torch.ones(64), 0.5)
    replicated = torch.nn.functional.dropout(torch.ones(64), 0.5)
    with tensor_parallel_rng():
        sharded_again = torch.rand(4)
    return {"sharded": sharded, "replicated": replicated, "sharded_again": sharded_again}
