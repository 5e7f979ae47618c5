"""Benchmark of the fast-weight memory kernels: forward+backward time, TFLOP/s and GB/s.

    python bench/kernels.py            # GPU: presets 760m / 1.3b at 4K context, ~16K tokens
    python bench/kernels.py --quick    # anywhere: tiny shapes, PyTorch path only on CPU

Implementations: ``torch`` (the whole-sequence PyTorch forms, kernels/memory/sequence_torch.py: the
CPU path of the model), ``triton`` (the per-chunk kernels of kernels/memory/triton_impl.py in a
Python chunk loop, plain targets: the earlier model path, kept as a comparison), ``triton_seq`` (the
whole-sequence kernels the model runs: triton_sequence.py for linear memories, triton_mlp_sequence.py
for MLP memories with HOPE's self-generated targets, triton_projection.py for the projection pass) and,
for the gated-delta-rule case, flash-linear-attention's ``chunk_gated_delta_rule`` when ``fla``
imports (CUDA only). On CPU with ``TRITON_INTERPRET=1`` the Triton rows run in the interpreter on
minute shapes (a plumbing check, not a speed). Every implementation runs
the whole sequence (the model's chunk loop for ours, one call for fla), forward then backward of the
sum of all outputs. Prints a table and writes JSON (default bench/results/kernels.json).

FLOPs are counted, not measured: :func:`affine_flops` and :func:`memory_flops` (formula in their
docstrings and docs/KERNELS.md); a training step counts 3x the forward FLOPs (backward = 2x
forward, recomputation not counted, the MFU convention). Bytes are the kernels' compulsory HBM
traffic (:func:`memory_bytes`). Ceilings: the device's dense bf16 tensor-core peak and HBM bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kernels.memory import MemorySpec  # noqa: E402
from kernels.memory.dispatch import interpreter_on, memory_sequence  # noqa: E402
from kernels.memory import available_impls  # noqa: E402
from kernels.testing import memory_inputs, run_sequence  # noqa: E402

PRESETS = {  # d_model, heads (d_h = d_model / heads), batch so that batch x 4096 ~ 16K tokens
    "760m": dict(d_model=1536, heads=16, T=4096, batch=4, chunk=64, e=2),
    "1.3b": dict(d_model=2048, heads=8, T=4096, batch=4, chunk=64, e=2),
}
QUICK = {"tiny": dict(d_model=128, heads=4, T=256, batch=1, chunk=32, e=2)}
INTERP = {"minute": dict(d_model=32, heads=2, T=40, batch=1, chunk=16, e=2)}
CASES = {  # the memories HOPE and Gated DeltaNet run (nl_pretrain/presets.py)
    "hope_proj_linear": MemorySpec("linear", "gd", "l2", "running", True),
    "hope_main_mlp": MemorySpec("mlp", "gd", "l2", "chunk_start", True),
    "gated_deltanet": MemorySpec("linear", "gd", "l2", "running", False),
    "hope_projection": MemorySpec("linear", "gd", "l2", "running", True),
}
SELF_TARGETS = {"hope_main_mlp"}     # HOPE's main memory learns from M_ref(l2norm(v)) (Eq. 84-85)
PROJECTION = {"hope_projection"}     # the stacked k, v, eta, alpha memories (projection_sequence)
CEILINGS = {  # dense bf16 FLOP/s, HBM bytes/s
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


def affine_flops(c, o, d, reads, momentum, solve, dgd):
    """Forward FLOPs of one ``affine_rank1_chunk`` on one row (matmuls only, 2mnk each), m = 1 with
    momentum, as the kernel executes them:

    ``2cod (1+m)`` (W_new, S_new from the key outer products)
    + solve (dgd or a running gradient): ``2c^2 d`` (K K^T) + ``2cod (1+m)`` (K W0^T, K S0^T)
      + ``2c^2 o`` ((Dp.A) w) + ``c^3/3`` (triangular inverse) + ``2c^2 o`` (Y = T rhs)
    + reads: ``2c^2 d`` (Q K^T) + ``2cod (1+m)`` (Q W0^T, Q S0^T) + ``2c^2 o (1 + dgd)``
    + momentum: ``2c^3`` (Dp = Gp Bm).
    """
    m = 1 if momentum else 0
    f = 2 * c * o * d * (1 + m)
    if solve:
        f += 2 * c * c * d + 2 * c * o * d * (1 + m) + 4 * c * c * o + c ** 3 / 3
    if reads:
        f += 2 * c * c * d + 2 * c * o * d * (1 + m) + 2 * c * c * o * (2 if dgd else 1)
    if momentum:
        f += 2 * c ** 3
    return f


def _calls(spec, d, e):
    """``(o, d_in, solve, dgd)`` of each affine call a memory makes, and its PyTorch prep FLOPs/token."""
    dgd = spec.rule == "dgd"
    if spec.kind == "linear":
        solve = dgd or (spec.loss == "l2" and spec.grad_at == "running")
        prep = 2 * d * d if (spec.loss == "l2" and spec.grad_at == "chunk_start") else 0
        return [(d, d, solve, dgd)], prep
    h = int(e * d)
    prep = 2 * h * d * 2 + 2 * d * h * 2          # K W2^T (twice: gradient, read), W1 h, r W1
    return [(h, d, dgd, dgd), (d, h, False, False)], prep


def memory_flops(spec, N, T, d, e, C):
    """Forward FLOPs of one memory over ``T`` tokens of ``N`` rows in chunks of ``C`` (the last chunk
    may be short): the sum of :func:`affine_flops` over its calls plus the per-chunk PyTorch prep
    (chunk-start gradients: ``2d^2`` per token for linear, ``8hd`` for an MLP with hidden h)."""
    calls, prep = _calls(spec, d, e)
    total = 0.0
    for s in range(0, T, C):
        c = min(C, T - s)
        total += sum(affine_flops(c, o, di, True, spec.momentum, solve, dgd) for o, di, solve, dgd in calls)
        total += prep * c
    return N * total


def memory_bytes(spec, N, T, d, e, C, token_bytes):
    """Compulsory HBM bytes of a training step of the kernels: per chunk, inputs (K, Q in the token
    dtype; w, eta/alpha/rho, W0, S0 in fp32) are read 3x (forward, backward, and their gradients
    written once), outputs (reads, W_new, S_new) 2x (written forward, cotangents read backward)."""
    calls, _ = _calls(spec, d, e)
    m = 2 if spec.momentum else 1
    total = 0.0
    for o, di, _, _ in calls:
        per_tok_in = 2 * di * token_bytes + o * 4 + 3 * 4
        per_tok_out = o * 4
        per_chunk_state = m * o * di * 4
        chunks = -(-T // C)
        total += 3 * (T * per_tok_in + chunks * per_chunk_state) + 2 * (T * per_tok_out + chunks * per_chunk_state)
    return N * total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup, reps):
    """Median wall time in ms of ``reps`` synchronised calls (robust to a busy shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_ours(spec, impl, shape, device, dtype, warmup, reps, self_targets=False):
    N, T, d = shape["batch"] * shape["heads"], shape["T"], shape["d_model"] // shape["heads"]
    ins = memory_inputs(spec, N=N, T=T, d=d, e=shape["e"], token_dtype=dtype, device=device,
                        eta_scale=1 / 16, alpha_gap=0.002)

    def run():
        if impl == "triton":
            return run_sequence(spec, ins, shape["chunk"], impl)
        reads, state, mom = memory_sequence(spec, ins["state"], ins["mom"], ins["k"], ins["vhat"], ins["eta"],
                                            ins["alpha"], ins["beta"], ins["q"], shape["chunk"],
                                            self_targets=self_targets, impl="torch" if impl == "torch" else "triton")
        return (reads,) + tuple(state) + (tuple(mom) if mom is not None else ())

    return _measure_outputs(run, device, warmup, reps)


def bench_projection(spec, impl, shape, device, dtype, warmup, reps):
    """HOPE's projection pass (four stacked linear memories, self-generated targets)."""
    from kernels.memory.dispatch import projection_sequence
    N, T, d = shape["batch"] * shape["heads"], shape["T"], shape["d_model"] // shape["heads"]
    g = torch.Generator().manual_seed(0)
    R = 2 * d + 2
    P = torch.randn(N, R, d, generator=g) * 0.02
    P[:, :2 * d] += torch.cat([torch.eye(d)] * 2)
    leaf = lambda x, dt=torch.float32: x.to(device=device, dtype=dt).requires_grad_()  # noqa: E731
    P, S = leaf(P), leaf(torch.zeros(N, R, d))
    u = leaf(torch.nn.functional.normalize(torch.randn(N, T, d, generator=g), dim=-1), dtype)
    beta = leaf(torch.full((N, 4), 0.9))
    eb, ab = leaf(torch.full((N,), -2.0)), leaf(torch.full((N,), 4.0))

    def run():
        (k, v, e, a), PT, ST = projection_sequence(spec, P, S, u, beta, eb, ab, 1.0, shape["chunk"],
                                                   impl="torch" if impl == "torch" else "triton")
        return k, v, e, a, PT, ST

    return _measure_outputs(run, device, warmup, reps)


def bench_fla(shape, device, dtype, warmup, reps):
    """fla's chunk_gated_delta_rule on the same shapes (gated delta rule, no momentum)."""
    import inspect

    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    B, H, T, d = shape["batch"], shape["heads"], shape["T"], shape["d_model"] // shape["heads"]
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q = torch.nn.functional.normalize(mk(B, T, H, d), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(mk(B, T, H, d), dim=-1).requires_grad_()
    v = mk(B, T, H, d).requires_grad_()
    g = torch.log(1 - 0.002 * torch.rand(B, T, H, device=device)).requires_grad_()
    beta = (0.05 + 0.4 * torch.rand(B, T, H, device=device) / 16).to(dtype).requires_grad_()
    h0 = torch.randn(B, H, d, d, device=device, dtype=torch.float32).requires_grad_()
    kw = dict(scale=1.0, initial_state=h0, output_final_state=True)
    if "head_first" in inspect.signature(chunk_gated_delta_rule).parameters:
        kw["head_first"] = False

    def fwd():
        with torch.no_grad():
            chunk_gated_delta_rule(q, k, v, g, beta, **kw)

    def fwd_bwd():
        o, ht = chunk_gated_delta_rule(q, k, v, g, beta, **kw)
        (o.float().sum() + ht.sum()).backward()
    return _measure(fwd, fwd_bwd, device, warmup, reps)


def _measure_outputs(run, device, warmup, reps):
    """Time ``run()`` (a tuple of outputs) forward only, and forward + backward of their sum."""
    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        sum(o.float().sum() for o in run()).backward()
    return _measure(fwd, fwd_bwd, device, warmup, reps)


def _measure(fwd, fwd_bwd, device, warmup, reps):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t_f = _timed(fwd, device, warmup, reps)
    t_fb = _timed(fwd_bwd, device, warmup, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else None
    return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_mib=peak)


def ceilings(device):
    if device.type != "cuda":
        return None, None, platform.processor() or "cpu"
    name = torch.cuda.get_device_name(device)
    for key, (flops, bw) in CEILINGS.items():
        if key in name:
            return flops, bw, name
    return None, None, name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (runs on CPU in seconds)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "kernels.json"))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    interp = device.type == "cpu" and interpreter_on() and "triton" in available_impls()
    shapes = INTERP if interp else QUICK if (args.quick or device.type != "cuda") else PRESETS
    reps = args.reps or (5 if device.type != "cuda" else 10)
    triton_ok = (device.type == "cuda" or interp) and "triton" in available_impls()
    impls = ["torch"] + (["triton"] if triton_ok else [])
    peak_flops, peak_bw, dev_name = ceilings(device)
    token_bytes = torch.finfo(dtype).bits // 8
    rows = []
    for sname, shape in shapes.items():
        N, T, d = shape["batch"] * shape["heads"], shape["T"], shape["d_model"] // shape["heads"]
        for cname in args.cases.split(","):
            spec = CASES[cname]
            flops = 3 * memory_flops(spec, N, T, d, shape["e"], shape["chunk"])
            nbytes = memory_bytes(spec, N, T, d, shape["e"], shape["chunk"], token_bytes)
            if cname in PROJECTION:   # FLOPs/bytes of the four memories ~ one of 2d+2 rows: not modelled
                flops = nbytes = None
                mine = ["torch"] + (["triton_seq"] if "triton" in impls else [])
                todo = [(i, lambda i=i: bench_projection(spec, i, shape, device, dtype, 1, reps)) for i in mine]
            else:
                mine = impls + (["triton_seq"] if "triton" in impls else [])
                st = cname in SELF_TARGETS
                todo = [(i, lambda i=i: bench_ours(spec, i, shape, device, dtype, 1, reps,
                                                   self_targets=st and i != "triton")) for i in mine]
            if cname == "gated_deltanet" and device.type == "cuda":
                todo.append(("fla", lambda: bench_fla(shape, device, dtype, 1, reps)))
            for impl, fn in todo:
                row = dict(shape=sname, case=cname, impl=impl, N=N, T=T, d_h=d, chunk=shape["chunk"],
                           dtype=str(dtype).replace("torch.", ""), train_flops=flops, train_bytes=nbytes)
                try:
                    row.update(fn())
                    sec = row["fwd_bwd_ms"] / 1e3
                    row["tflops"] = flops / sec / 1e12 if flops else None
                    row["gbps"] = nbytes / sec / 1e9 if nbytes else None
                    row["pct_flops_peak"] = 100 * flops / sec / peak_flops if (peak_flops and flops) else None
                    row["pct_bw_peak"] = 100 * nbytes / sec / peak_bw if (peak_bw and nbytes) else None
                except Exception as exc:  # fla missing or failing: record, keep going
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                _print_row(row)
    result = dict(device=dev_name, torch=torch.__version__, quick=shapes is not PRESETS, interpreter=interp,
                  ceilings=dict(bf16_flops=peak_flops, hbm_bytes_per_s=peak_bw),
                  flop_convention="train = 3 x forward matmul FLOPs (affine_flops/memory_flops)",
                  note=("CPU smoke run (PyTorch path; Triton rows, if any, in the interpreter): plumbing, "
                        "not speed" if device.type != "cuda" else "GPU run"),
                  rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"device {dev_name}; wrote {args.out}")
    return result


_HEADER = False


def _print_row(r):
    global _HEADER
    if not _HEADER:
        print(f"{'shape':6} {'case':17} {'impl':10} {'N':>4} {'T':>5} {'d_h':>4} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'TFLOP/s':>8} {'GB/s':>8} {'%flop':>6} {'%bw':>6} {'peak MiB':>9}")
        _HEADER = True
    if "error" in r:
        print(f"{r['shape']:6} {r['case']:17} {r['impl']:10} error: {r['error']}")
        return
    pct = lambda x: f"{x:6.2f}" if x is not None else "     -"  # noqa: E731
    num = lambda x, w, p: f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"  # noqa: E731
    mem = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else "        -"
    print(f"{r['shape']:6} {r['case']:17} {r['impl']:10} {r['N']:4d} {r['T']:5d} {r['d_h']:4d} {r['fwd_ms']:9.2f} "
          f"{r['fwd_bwd_ms']:11.2f} {num(r['tflops'], 8, 3)} {num(r['gbps'], 8, 2)} {pct(r['pct_flops_peak'])} "
          f"{pct(r['pct_bw_peak'])} {mem}")


if __name__ == "__main__":
    main()
