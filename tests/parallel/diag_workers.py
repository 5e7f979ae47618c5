"""Per-rank function of tests/parallel/test_diagnose.py (real gloo processes through harness.py)."""
from __future__ import annotations

import torch

from nl_pretrain.config import build_config


def diagnose_probe(tree, overflow_rank: int):
    """Two diagnoses on this rank's first micro-batch: with the trained weights as built (every rank's
    re-run is finite), then with rank ``overflow_rank``'s main-memory weights of block 1 scaled by 1e20
    (only that rank's forward overflows)."""
    import torch.distributed as dist
    from nl_pretrain.parallel.trainer import DistributedTrainer, rank_batches
    from nl_pretrain.train.diagnostics import explain
    trainer = DistributedTrainer(build_config(tree))
    cfg = trainer.cfg
    data = rank_batches(cfg, trainer.layout, trainer.dp_rank)
    batches = [next(data)]
    lines = [explain(trainer, batches)]
    if dist.get_rank() == overflow_rank:
        with torch.no_grad():
            for w in trainer.model.blocks[1].mixer.main_init.weights:
                w.mul_(1e20)
    lines.append(explain(trainer, batches))
    return lines
