"""Per-rank peak memory of a training step: the memory model's estimate against a measurement (CPU).

    .venv/bin/python bench/memory.py [--only NAME ...] [--long-context] [--triton]

The results in bench/results/ come from three runs: ``bench/memory.py`` (memory.json, ~3 min),
``--only --long-context --out bench/results/memory_long_context.json`` (~25 min) and
``--only --triton --out bench/results/memory_triton.json`` (~1 min).

Measured: one training step (forward, backward, AdamW step) after a warm-up step, PyTorch memory
path, fp32 (one row bf16: autocast over fp32 weights, as one process runs it): in one process (the first rows), or on every rank of a real 2-rank DeepSpeed job over
gloo (TP / PP / ZeRO rows; the largest rank is reported, on the built-in byte corpus with its
packed documents). The peak is the largest sum, during the step, of the storages alive: those
held at its start (one process: every storage of the model and the optimizer; distributed: every
floating-point tensor the Python heap reaches, engine buffers included; the corpus's token ids stay
on the host) and those created during it, each counted until it is freed: a dispatch mode sees
every storage an operator creates, a weak reference on each storage sees it released
(:class:`nl_pretrain.parallel.memory_model.LiveBytes`): exact bytes
of live tensors, not RSS. Estimated: :func:`nl_pretrain.parallel.memory_model.estimate` for the
same config and layout (distributed rows: for the measured rank's stage, with the packing blow-up
of its batch). ``--long-context``: HOPE at a tiny width from 2K to 32K tokens, activation bytes
(kept after the forward) per token, with and without ``model.recompute_chunks``. ``--triton``: the
Triton path's saved bytes per block, the real kernels (interpreter) against the model's stand-ins.
Writes a table and bench/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import load_average, machine, write_json  # noqa: E402

MIB = 2 ** 20
BASE = ["--model.memory_impl=torch", "--model.max_seq_len=65536", "--optim.name=adamw"]
CONFIGS = {
    "hope T=256 B=2": ["--model.preset=hope-tiny", "--data.seq_len=256", "--train.micro_batch_size=2"],
    "hope T=1024 B=1": ["--model.preset=hope-tiny", "--data.seq_len=1024", "--train.micro_batch_size=1"],
    "hope T=512 B=1 act-ckpt": ["--model.preset=hope-tiny", "--data.seq_len=512", "--train.micro_batch_size=1",
                                "--parallel.activation_checkpointing=true"],
    "hope T=512 B=1 recompute": ["--model.preset=hope-tiny", "--data.seq_len=512", "--train.micro_batch_size=1",
                                 "--model.recompute_chunks=true"],
    "hope T=256 B=2 bf16 (autocast)": ["--model.preset=hope-tiny", "--data.seq_len=256", "--train.micro_batch_size=2",
                                       "--train.precision=bf16"],
    "titans T=512 B=2": ["--model.preset=titans-tiny", "--data.seq_len=512", "--train.micro_batch_size=2"],
    "gated_deltanet T=512 B=2": ["--model.preset=gated_deltanet-tiny", "--data.seq_len=512",
                                 "--train.micro_batch_size=2"],
    "transformer T=512 B=4": ["--model.preset=transformer-tiny", "--data.seq_len=512", "--train.micro_batch_size=4"],
    "transformer T=1024 B=2 act-ckpt": ["--model.preset=transformer-tiny", "--data.seq_len=1024",
                                        "--train.micro_batch_size=2", "--parallel.activation_checkpointing=true"],
    "hope_attention T=256 B=2": ["--model.preset=hope_attention-tiny", "--data.seq_len=256",
                                 "--train.micro_batch_size=2"],
}


class _Ckpt(torch.nn.Module):
    """A block recomputed in the backward (torch.utils.checkpoint; one process, no DeepSpeed)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, docs=None):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.block, x, docs, use_reentrant=False)


def measure(cfg) -> dict:
    """Peak bytes of the second training step of ``cfg`` in this process, and the bytes kept after its forward."""
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.memory_model import LiveBytes, held_bytes
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    if cfg.parallel.activation_checkpointing:
        model.blocks = torch.nn.ModuleList(_Ckpt(b) for b in model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (B, T))

    def step(tracker=None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):   # one process
            loss = model.loss(ids, ids)
        kept = tracker.current if tracker is not None else 0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return kept

    step()
    before = held_bytes(model, opt)
    t0 = time.perf_counter()
    with LiveBytes().hold(model, opt) as live:
        kept = step(live)
    return {"peak": live.peak, "held_before": before, "kept_after_forward": kept,
            "seconds": round(time.perf_counter() - t0, 2)}


DIST_BASE = ["--data.max_documents=200", "--data.val_fraction=0", "--train.progress=false", "--train.steps=2",
             "--train.threads=1", "--optim.warmup_steps=0"]
DISTRIBUTED = {   # name: (world size, overrides); real DeepSpeed engines over gloo, 2 ranks
    "hope TP2 T=256 B=2": (2, ["--model.preset=hope-tiny", "--parallel.tensor=2", "--data.seq_len=256",
                               "--train.micro_batch_size=2"]),
    "hope PP2 T=256 B=1 accum 2": (2, ["--model.preset=hope-tiny", "--parallel.pipeline=2", "--data.seq_len=256",
                                       "--train.micro_batch_size=1", "--train.grad_accum=2"]),
    "hope DP2 ZeRO-2 T=256 B=2": (2, ["--model.preset=hope-tiny", "--parallel.zero_stage=2", "--data.seq_len=256",
                                      "--train.micro_batch_size=2"]),
    "hope DP2 ZeRO-1 T=256 B=2": (2, ["--model.preset=hope-tiny", "--parallel.zero_stage=1", "--data.seq_len=256",
                                      "--train.micro_batch_size=2"]),
    "titans TP2 act-ckpt T=512 B=2": (2, ["--model.preset=titans-tiny", "--parallel.tensor=2", "--data.seq_len=512",
                                          "--train.micro_batch_size=2", "--parallel.activation_checkpointing=true"]),
    "transformer DP2 ZeRO-3 T=512 B=4": (2, ["--model.preset=transformer-tiny", "--parallel.zero_stage=3",
                                             "--data.seq_len=512", "--train.micro_batch_size=4"]),
}


def _heap_tensors() -> list:
    """Every floating-point tensor the Python heap reaches (engine buffers, optimizer state, weights
    and their gradients; not the corpus's token ids, which stay on the host)."""
    import gc
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _rank_measure(overrides):
    """On one rank: the peak of the second training step and the packed-document blow-up of its batch."""
    from nl_pretrain.config import load_config
    from nl_pretrain.model.packing import Documents, alignment
    from nl_pretrain.parallel.memory_model import LiveBytes
    from nl_pretrain.parallel.trainer import DistributedTrainer, rank_batches
    torch.set_num_threads(1)
    cfg = load_config(None, BASE + DIST_BASE + overrides)
    trainer = DistributedTrainer(cfg)
    data = rank_batches(cfg, trainer.layout, trainer.dp_rank)
    trainer.train_step(0, [next(data) for _ in range(cfg.train.grad_accum)])
    batches = [next(data) for _ in range(cfg.train.grad_accum)]
    align = alignment(trainer.model.blocks)
    packing = max(Documents(b["doc_ids"], align).length for b in batches) / cfg.data.seq_len
    from nl_pretrain.parallel.memory_model import held_bytes
    roots = [_heap_tensors(), trainer.model, trainer.engine.module]
    before = held_bytes(*roots)
    with LiveBytes().hold(*roots) as live:
        del roots
        trainer.train_step(1, batches)
    return {"peak": live.peak, "held_before": before, "packing": packing,
            "stage": trainer.pp_rank}


def measure_distributed(world: int, overrides) -> list:
    sys.path.insert(0, str(ROOT / "tests" / "parallel"))
    from harness import run_distributed
    return run_distributed(_rank_measure, world, overrides, timeout=900)


def estimated(cfg) -> dict:
    from nl_pretrain.parallel.memory_model import estimate
    from nl_pretrain.parallel.topology import Layout
    return estimate(cfg, Layout(1, 1, 1, 0, cfg.train.micro_batch_size, 1))


def table(rows) -> str:
    head = f"{'config':34s} {'measured MiB':>13s} {'estimate MiB':>13s} {'est/meas':>9s}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:34s} {r['measured'] / MIB:13.1f} {r['estimate'] / MIB:13.1f} {r['ratio']:9.3f}")
    return "\n".join(lines)


def long_context(lengths, recompute: bool) -> dict:
    """Bytes kept after the forward of a tiny-width HOPE (d=32, 2 heads, 1 layer), per length."""
    from nl_pretrain.config import load_config
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.memory_model import LiveBytes
    out = {}
    for T in lengths:
        cfg = load_config(None, BASE + LONG + [f"--data.seq_len={T}", f"--model.recompute_chunks={recompute}"])
        torch.manual_seed(0)
        model = LanguageModel(cfg.model)
        ids = torch.randint(0, cfg.model.vocab_size, (1, T))
        t0 = time.perf_counter()
        with LiveBytes() as live:
            loss = model.loss(ids, ids)
            kept = live.current
            loss.backward()
        from nl_pretrain.parallel.memory_model import activation_profile
        est = sum(activation_profile(cfg.model, 1, T).values())      # saved by the block and the loss
        out[T] = {"kept_after_forward": kept, "peak": live.peak, "bytes_per_token": kept / T,
                  "estimate_kept": est, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  T={T:6d} recompute={recompute!s:5s} kept {kept / MIB:9.1f} MiB ({kept / T:8.0f} B/token), "
              f"estimate {est / MIB:9.1f} MiB, peak {live.peak / MIB:9.1f} MiB, {out[T]['seconds']} s", flush=True)
    return out


def _block_saved_bytes(model, T: int) -> int:
    """Bytes of the distinct non-weight storages autograd saves in one block's forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, keep = {}, []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
            keep.append(t)
        return t
    x = model.embed(torch.randint(0, model.cfg.vocab_size, (1, T))).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x)
    return sum(seen.values())


def triton_child() -> None:
    """Inside ``TRITON_INTERPRET=1``: one block's saved bytes with the real Triton kernels against the
    memory model's Triton stand-ins (JSON on stdout)."""
    from nl_pretrain.config import load_config
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.parallel.memory_model import activation_profile
    out = {}
    for fam in ("hope", "titans", "gated_deltanet"):
        for T in (64, 128):
            cfg = load_config(None, [f"--model.preset={fam}-tiny", "--model.memory_impl=triton", "--model.n_layers=1",
                                     "--model.d_model=64", "--model.n_heads=2", "--model.vocab_size=256"])
            torch.manual_seed(0)
            real = _block_saved_bytes(LanguageModel(cfg.model), T)
            prof = activation_profile(cfg.model, 1, T, impl="triton")
            est = prof["per_token"] + prof["fast_weight_states"] + prof["intra_chunk"]
            out[f"{fam} T={T}"] = {"kernels": real, "model": est, "ratio": est / real}
    print(json.dumps(out))


def triton_rows() -> dict:
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--triton-child"], env=env, capture_output=True, text=True,
                          timeout=1800, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in rows.items():
        print(f"  triton {name:22s} kernels {r['kernels'] / MIB:8.3f} MiB  model {r['model'] / MIB:8.3f} MiB  "
              f"ratio {r['ratio']:.4f}")
    return rows


LONG = ["--model.preset=hope-tiny", "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1",
        "--model.vocab_size=256", "--train.micro_batch_size=1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None,
                    help="config names to run (default: all; none named: only --long-context / --triton)")
    ap.add_argument("--long-context", action="store_true", help="also the 2K-32K long-context table")
    ap.add_argument("--lengths", nargs="*", type=int, default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--triton", action="store_true", help="also the Triton path: real kernels (interpreter) vs model")
    ap.add_argument("--triton-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = ap.parse_args()
    if args.triton_child:
        return triton_child()
    torch.set_num_threads(1)
    from nl_pretrain.config import load_config
    rows = {}
    for name, ov in CONFIGS.items():
        if args.only is not None and name not in args.only:
            continue
        cfg = load_config(None, BASE + ov)
        meas, est = measure(cfg), estimated(cfg)
        rows[name] = {"overrides": ov, "measured": meas["peak"], "estimate": est["total"],
                      "ratio": est["total"] / meas["peak"], "measurement": meas,
                      "estimate_parts": {k: v for k, v in est.items()}}
        print(f"{name:34s} measured {meas['peak'] / MIB:8.1f} MiB  estimate {est['total'] / MIB:8.1f} MiB  "
              f"ratio {est['total'] / meas['peak']:.3f}  ({meas['seconds']} s)", flush=True)
    for name, (world, ov) in DISTRIBUTED.items():
        if args.only is not None and name not in args.only:
            continue
        from nl_pretrain.parallel.memory_model import estimate
        from nl_pretrain.parallel.topology import check_layout
        cfg = load_config(None, BASE + DIST_BASE + ov)
        layout = check_layout(cfg, world)
        t0 = time.perf_counter()
        ranks = measure_distributed(world, ov)
        for r in ranks:                       # every rank against the estimate for its own stage
            r["estimate"] = estimate(cfg, layout, r["stage"], packing=r["packing"], device="cpu")["total"]
            r["ratio"] = r["estimate"] / r["peak"]
        worst = max(ranks, key=lambda r: r["peak"])
        est = estimate(cfg, layout, worst["stage"], packing=worst["packing"], device="cpu")
        rows[name] = {"overrides": ov, "world": world, "measured": worst["peak"], "estimate": est["total"],
                      "ratio": est["total"] / worst["peak"], "measurement": {"ranks": ranks,
                                                                             "seconds": round(time.perf_counter() - t0, 1)},
                      "estimate_parts": est}
        print(f"{name:34s} measured {worst['peak'] / MIB:8.1f} MiB  estimate {est['total'] / MIB:8.1f} MiB  ratio "
              f"{est['total'] / worst['peak']:.3f}  (packing {worst['packing']:.2f}, stage {worst['stage']})", flush=True)
    print(table(rows))
    result = {"machine": machine(1), "load_average": load_average(),
              "method": "peak = storages held before the step + peak of storages created during it (dispatch "
                        "mode + weak references; exact tensor bytes, not RSS); PyTorch memory path, one process, fp32",
              "configs": rows}
    if args.triton:
        result["triton_path"] = {"method": "bytes one block saves for the backward (saved_tensors_hooks), the "
                                           "real Triton kernels under TRITON_INTERPRET=1 vs the memory model's "
                                           "stand-ins (d=64, 2 heads)", "rows": triton_rows()}
    if args.long_context:
        result["long_context"] = {"overrides": LONG, "off": long_context(args.lengths, False),
                                  "on": long_context(args.lengths, True)}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
