"""Outer optimizers (issue 14): step time relative to AdamW at the 340m preset's matrix shapes,
optimizer state bytes per parameter, and the held-out loss of the tiny HOPE and Transformer++ after
the same tokens with each optimizer, and the optimizer state each data-parallel rank keeps at DP1 vs
DP2 (ZeRO-1 and ZeRO-3, real gloo processes). Writes bench/results/optim.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/optim.py [--steps 100] [--threads 1] [--sections dp_state ...]

``--sections`` runs only the named ones (step_time, state_bytes, heldout, dp_state) and keeps the
others' results already in the JSON file.

Step time: one block's weight matrices of ``hope-340m`` (every block has the same shapes; the
embedding and other AdamW tensors add the same absolute time under every optimizer), fp32, this
machine's CPU, median of a few steps after a warm-up.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402

from nl_pretrain.config import OPTIMIZERS, build_config  # noqa: E402
from nl_pretrain.model import LanguageModel  # noqa: E402
from nl_pretrain.optim import ModelOptimizer, build_optimizer, lr_at, optimizer_groups, param_role  # noqa: E402
from nl_pretrain.train.data import build_data  # noqa: E402


def block_matrices(preset="hope-340m"):
    cfg = build_config({"model": {"preset": preset}})
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()
            if n.startswith("blocks.0.") and param_role(n, p, "muon") == "matrix"]


def step_times(shapes, reps=3):
    torch.manual_seed(0)
    params = [(n, torch.nn.Parameter(torch.randn(*s) * 0.02)) for n, s in shapes]
    grads = [torch.randn(*s) * 1e-3 for _, s in shapes]
    out = {}
    for name in OPTIMIZERS:
        cfg = build_config({"optim": {"name": name}}).optim
        opt = build_optimizer(optimizer_groups(params, cfg), cfg)
        times = []
        for _ in range(reps + 1):
            for (_, p), g in zip(params, grads):
                p.grad = g
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = sorted(times[1:])[len(times[1:]) // 2]
    return {k: {"seconds": v, "vs_adamw": v / out["adamw"]} for k, v in out.items()}


def state_bytes(preset):
    """Optimizer state bytes per model parameter (fp32), from one real optimizer of the tiny preset
    and the closed form for the 340m shapes."""
    out = {}
    cfg = build_config({"model": {"preset": preset}})
    for name in OPTIMIZERS:
        c = build_config({"model": {"preset": preset}, "optim": {"name": name}})
        torch.manual_seed(0)
        model = LanguageModel(c.model)
        opt = ModelOptimizer(model, c.optim, c.model.cms)
        for o in [opt.base] + [lv["opt"] for lv in opt.slow.values()]:
            if hasattr(o, "init_state"):
                o.init_state()
            else:
                for g in o.param_groups:
                    for p in g["params"]:
                        o.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        total = sum(t.numel() * t.element_size() for o in [opt.base] + [lv["opt"] for lv in opt.slow.values()]
                    for st in o.state.values() for k, t in st.items() if k != "step" and torch.is_tensor(t))
        n = sum(p.numel() for p in model.parameters())
        out[name] = total / n
    del cfg
    return out


def heldout(family, steps, micro, seq, lr, threads):
    res = {}
    for name in OPTIMIZERS:
        tree = {"model": {"preset": f"{family}-tiny", "vocab_size": 260, "max_seq_len": seq},
                "data": {"seq_len": seq, "val_fraction": 0.05},
                "optim": {"name": name, "lr": lr, "warmup_steps": max(1, steps // 10)},
                "train": {"steps": steps, "micro_batch_size": micro, "seed": 0}}
        cfg = build_config(tree)
        torch.manual_seed(0)
        model = LanguageModel(cfg.model)
        opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
        data = build_data(cfg.data, micro, 0)
        t0 = time.perf_counter()
        train_losses = []
        for step in range(steps):
            b = next(data.train)
            loss = model.loss(b["input_ids"], b["labels"], b["doc_ids"])
            loss.backward()
            opt.step(step, lr_at(step, cfg.optim, steps))
            opt.zero_grad()
            train_losses.append(float(loss.detach()))
        wall = time.perf_counter() - t0
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b in itertools.islice(data.make_val(), 16):
                logits = model(b["input_ids"], b["doc_ids"])
                total += float(torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), b["labels"].view(-1),
                                                                 ignore_index=-100, reduction="sum"))
                count += int((b["labels"] != -100).sum())
        res[name] = {"val_loss": total / count if count else math.nan, "final_train_loss": train_losses[-1],
                     "train_s": wall, "tokens": steps * micro * seq}
        print(family, name, res[name], flush=True)
    return res


def dp_state_rank(trees):
    """One rank: for each tree, one training step, then the optimizer state bytes this rank keeps
    (the engine's optimizer: AdamW partitions and matrix-rule state; the slow CMS levels beside it)."""
    from megatron.core import parallel_state as ps
    from nl_pretrain.parallel.access import inner_torch_optimizer
    from nl_pretrain.parallel.trainer import DistributedTrainer, rank_batches

    def nbytes(states):
        return sum(t.numel() * t.element_size() for st in states for k, t in st.items()
                   if k != "step" and torch.is_tensor(t))
    out = []
    for tree in trees:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        cfg = build_config(tree)
        trainer = DistributedTrainer(cfg)
        data = rank_batches(cfg, trainer.layout, trainer.dp_rank)
        for step in range(4):                     # the period-4 slow level updates (and has state) at step 3
            trainer.train_step(step, [next(data)])
        opt = inner_torch_optimizer(trainer.engine.optimizer)
        matrix = [opt._state_of(g)[1] for g in opt.param_groups if g.get("rule", "adamw") != "adamw"]
        out.append({"engine": nbytes(opt.state.values()), "matrix": nbytes(matrix),
                    "slow": nbytes(st for lv in trainer.slow.levels.values() for st in lv["opt"].state.values()),
                    "params": trainer.n_params})
    return out


def dp_state(zero_stages=(1, 3), seq=32):
    """State bytes per rank, DP1 vs DP2, for every optimizer (hope-tiny, one micro-batch of ``seq``)."""
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(ROOT / "tests" / "parallel"))
    from harness import run_distributed
    cases = [(z, name) for z in zero_stages for name in OPTIMIZERS]
    trees = [{"model": {"preset": "hope-tiny", "vocab_size": 260, "max_seq_len": seq},
              "data": {"seq_len": seq, "max_documents": 50, "val_fraction": 0.0},
              "optim": {"name": name, "warmup_steps": 0},
              "train": {"steps": 4, "micro_batch_size": 1, "seed": 0, "progress": False, "threads": 1},
              "parallel": {"zero_stage": z}} for z, name in cases]
    one = run_distributed(dp_state_rank, 1, trees, timeout=1800)[0]
    two = run_distributed(dp_state_rank, 2, trees, timeout=1800)
    res = {}
    for i, (z, name) in enumerate(cases):
        ranks = [r[i] for r in two]
        per_rank = [r["engine"] + r["slow"] for r in ranks]
        base = one[i]["engine"] + one[i]["slow"]
        res.setdefault(f"zero{z}", {})[name] = {
            "dp1_bytes": base, "dp2_bytes_per_rank": per_rank, "dp2_max_over_dp1": max(per_rank) / base,
            "dp1_matrix_bytes": one[i]["matrix"], "dp2_matrix_bytes_per_rank": [r["matrix"] for r in ranks],
            "slow_level_bytes_per_rank": ranks[0]["slow"], "params": one[i]["params"]}
        print(f"ZeRO-{z} {name:15s} DP1 {base / 1e6:7.2f} MB  DP2 per rank "
              f"{', '.join(f'{b / 1e6:.2f}' for b in per_rank)} MB  ({max(per_rank) / base:.2f}x)", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/optim.json")
    ap.add_argument("--sections", nargs="+", default=["step_time", "state_bytes", "heldout", "dp_state"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() and set(a.sections) != {"step_time", "state_bytes",
                                                                                 "heldout", "dp_state"} else {}
    result["machine"] = f"CPU, {a.threads} thread(s), fp32"
    if "step_time" in a.sections:
        shapes = block_matrices()
        result["step_time_shapes"] = [list(s) for _, s in shapes]
        result["step_time_340m_block"] = step_times(shapes)
        print(result["step_time_340m_block"], flush=True)
    if "state_bytes" in a.sections:
        result["state_bytes_per_param"] = {"hope-tiny": state_bytes("hope-tiny"),
                                           "transformer-tiny": state_bytes("transformer-tiny")}
        print(result["state_bytes_per_param"], flush=True)
    if "heldout" in a.sections:
        result["heldout"] = {"settings": {"steps": a.steps, "micro": a.micro, "seq": a.seq, "lr": a.lr},
                             "hope-tiny": heldout("hope", a.steps, a.micro, a.seq, a.lr, a.threads),
                             "transformer-tiny": heldout("transformer", a.steps, a.micro, a.seq, a.lr, a.threads)}
    if "dp_state" in a.sections:
        result["state_bytes_per_rank"] = {"note": "hope-tiny, bytes of optimizer state one rank keeps after 4 "
                                                  "steps (engine optimizer + slow CMS levels), DP1 vs DP2",
                                          **dp_state()}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
