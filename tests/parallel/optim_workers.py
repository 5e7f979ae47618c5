"""Per-rank functions of the optimizer layout tests: the layouts of workers.distributed_run, plus what
each rank keeps of the matrix rules' state (partitioned over data parallelism)."""
from __future__ import annotations

import math

from workers import distributed_run


def matrix_state(trainer) -> dict:
    """Bytes of matrix-rule state this rank holds and the bytes all of it takes (from the groups' shapes),
    summed over the matrix groups of the engine's optimizer and of the slow CMS levels' optimizers."""
    from nl_pretrain.parallel.access import inner_torch_optimizer
    opts = [inner_torch_optimizer(trainer.engine.optimizer)] + [lv["opt"] for lv in trainer.slow.levels.values()]
    held = total = slow = 0
    for i, opt in enumerate(opts):
        for g in opt.param_groups:
            if g.get("rule", "adamw") == "adamw":
                continue
            _, st = opt._state_of(g)
            held += sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
            total += sum(math.prod(s) * 4 for s in opt.state_shapes(g).values())
            slow += i > 0
    return {"held": held, "total": total, "slow_matrices": slow}


def optim_runs(trees):
    """``workers.distributed_run`` for each tree in turn, with this rank's matrix-state bytes."""
    from megatron.core import parallel_state as ps
    out = []
    for tree in trees:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        out.append(distributed_run(tree, probe=matrix_state))
    return out
