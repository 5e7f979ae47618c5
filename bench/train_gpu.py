"""Single-GPU training-step benchmark: HOPE-760M against Transformer++-760M at 4K context.

    python bench/train_gpu.py --out OUT_DIR                 # GPU: 24 layers, 4096 tokens, bf16 autocast
    python bench/train_gpu.py --out OUT_DIR --layers 8 --batch 2 --steps 3
    python bench/train_gpu.py --out OUT_DIR --smoke         # CPU, tiny config, seconds (a plumbing check)

One training step = ``model.loss`` under bf16 autocast (fp32 master weights; attention through
``F.scaled_dot_product_attention`` restricted to the flash backend with
``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), backward, and the project's own
optimizer step (``ModelOptimizer``: AdamW, gradient clipping, CMS step levels). ``memory_impl`` is
``auto`` (Triton on CUDA). Each family runs in its own subprocess with its own time limit (a hang or
crash in one leaves the other's numbers), warm-up steps first (they include Triton's compilation),
then timed steps, each ended by ``torch.cuda.synchronize()``. The micro-batch is the first of
``--batch`` (default 4,2,1) that does not run out of memory.

Reported per family: step times, tokens/s (micro-batch x T / median step), MFU and peak memory
(``torch.cuda.max_memory_allocated`` over the timed run: weights, gradients, AdamW moments and
activations). MFU = FLOPs/token x tokens/s / the device's dense bf16 peak, with FLOPs/token from
``nl_pretrain.train.flops.flops_per_token``, which DOES count the memories' inner loops (per head and
token a read, a gradient and a write of every fast-weight state, tripled for backward, plus the
intra-chunk matmuls) and causal attention (6 L T d); ``mfu_dense_6N`` is the plain 6N (+ attention)
convention for comparison. The embedding-lookup correction: ``flops_per_token`` subtracts the
embedding matrix for tied embeddings and keeps it for untied ones, the reverse of its own docstring
("6 N for every matmul weight that is not the embedding lookup"); this script reports that value as
``flops_per_token_repo`` and uses the corrected one (untied: minus the lookup table; tied: the table
is the output projection and counts). Writes ``OUT/train_gpu_<family>.json`` per family and
``OUT/train_gpu.json`` with both and the HOPE / Transformer++ ratios. If HOPE fails with the Triton
path (an error, not a timeout or out-of-memory) and time is left, it is run once more with
``memory_impl=torch`` and reported as ``hope_torch_fallback`` (the ratio then says which path it used).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
if ROOT in sys.path:          # the repo root first: bench/kernels.py must not shadow the kernels package
    sys.path.remove(ROOT)
sys.path.insert(0, ROOT)
if BENCH not in sys.path:
    sys.path.append(BENCH)    # bench/common.py

import torch  # noqa: E402

FAMILIES = ("transformer", "hope")
SMOKE = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=512, seq=64, batch="1", warmup=1, steps=1)


def model_config(family: str, args):
    from nl_pretrain.config import build_config
    from nl_pretrain.presets import preset_model_dict
    m = preset_model_dict(f"{family}-{args.size}")
    m.update(memory_impl=args.memory_impl, max_seq_len=max(args.seq, m["max_seq_len"]))
    if args.layers:
        m["n_layers"] = args.layers
    if args.smoke:
        m.update(d_model=SMOKE["d_model"], n_heads=SMOKE["n_heads"], n_layers=args.layers or SMOKE["n_layers"],
                 vocab_size=SMOKE["vocab_size"])
    return build_config({"model": m}).model


def flops(cfg, n_params: int, seq: int) -> dict:
    from nl_pretrain.train.flops import flops_per_token
    repo = flops_per_token(cfg, n_params, seq)
    embed = cfg.vocab_size * cfg.d_model
    corrected = repo + (6 * embed if cfg.tie_embeddings else -6 * embed)
    dense = 6 * (n_params - (0 if cfg.tie_embeddings else embed))
    if cfg.family in ("transformer", "hope_attention"):
        dense += 6 * cfg.n_layers * seq * cfg.d_model
    return dict(flops_per_token=corrected, flops_per_token_repo=repo, flops_per_token_dense_6N=float(dense),
                inner_loops_in_flops=cfg.family not in ("transformer",))


def _sdpa_flash():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:       # older torch: no restriction
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_family(family: str, args) -> dict:
    """Warm-up and timed training steps of one family; the first micro-batch that fits."""
    from nl_pretrain.config import OptimConfig
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.optim import ModelOptimizer
    from nl_pretrain.presets import preset_lr
    from nl_pretrain.train.flops import device_peak_tflops
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds if args.max_seconds else None
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = model_config(family, args)
    torch.manual_seed(0)
    model = LanguageModel(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    lr = preset_lr(f"{family}-{args.size}")
    opt = ModelOptimizer(model, OptimConfig(lr=lr, warmup_steps=0), cfg.cms)
    peak_tflops = device_peak_tflops(device)
    out = dict(family=family, preset=f"{family}-{args.size}", device=_device_name(device), n_params=n_params,
               n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, seq=args.seq,
               memory_impl_requested=cfg.memory_impl, memory_impl=(_resolved_impl(cfg.memory_impl, device) if family != "transformer" else "n/a (attention only)"),
               precision="bf16 autocast, fp32 weights", attention="sdpa flash backend",
               peak_tflops_bf16=peak_tflops or None, attempts=[], **flops(cfg, n_params, args.seq))
    attention_impl = "sdpa"
    try:
        from nl_pretrain.model import attention as attn_mod
        if getattr(attn_mod, "flash_attn_func", None) is not None and device.type == "cuda":
            attention_impl = "flash_attn package (attention.py prefers it over sdpa when installed)"
    except Exception:
        pass
    out["attention_impl"] = attention_impl
    step_no = [0]

    def step(inputs, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16), _sdpa_flash():
            loss = model.loss(inputs, labels)
        loss.backward()
        opt.step(step_no[0], lr)
        opt.zero_grad()
        step_no[0] += 1
        return loss

    for batch in [int(b) for b in str(args.batch).split(",")]:
        attempt = dict(batch=batch)
        out["attempts"].append(attempt)
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, cfg.vocab_size, (batch, args.seq + 1), generator=g).to(device)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            warm = []
            for _ in range(args.warmup):
                if deadline is not None and warm and time.perf_counter() + 2 * warm[-1] > deadline:
                    attempt["warmup_cut"] = f"time limit: {len(warm)} warm-up steps"
                    break                        # keep time for at least one timed step
                _sync(device)
                t0 = time.perf_counter()
                loss = step(inputs, labels)
                _sync(device)
                warm.append(time.perf_counter() - t0)
            times = []
            for i in range(args.steps):
                if deadline is not None and times and time.perf_counter() + statistics.median(times) > deadline:
                    attempt["stopped_early"] = f"time limit ({args.max_seconds} s) after {len(times)} timed steps"
                    break
                _sync(device)
                t0 = time.perf_counter()
                loss = step(inputs, labels)
                _sync(device)
                times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError as exc:
            attempt["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}"
            opt.zero_grad()
            model.zero_grad(set_to_none=True)
            del exc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        med = statistics.median(times) if times else statistics.median(warm)
        tokens = batch * args.seq
        tps = tokens / med
        res = dict(batch=batch, tokens_per_step=tokens, warmup_s=[round(t, 4) for t in warm],
                   step_s=[round(t, 4) for t in times], median_step_s=round(med, 4), tokens_per_s=round(tps, 1),
                   loss=round(float(loss.detach()), 4),
                   peak_mem_gib=(round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if device.type == "cuda"
                                 else None))
        if peak_tflops:
            res["mfu"] = round(out["flops_per_token"] * tps / (peak_tflops * 1e12), 4)
            res["mfu_dense_6N"] = round(out["flops_per_token_dense_6N"] * tps / (peak_tflops * 1e12), 4)
            res["achieved_tflops"] = round(out["flops_per_token"] * tps / 1e12, 2)
        attempt.update(res)
        out.update(res)
        break
    else:
        out["error"] = "no micro-batch fitted: " + "; ".join(a.get("error", "?") for a in out["attempts"])
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def _resolved_impl(requested, device) -> str:
    try:
        from kernels.memory.dispatch import resolve_impl
        return resolve_impl(requested, device)
    except Exception as exc:  # report, do not fail the benchmark on it
        return f"{requested} (unresolved: {type(exc).__name__}: {exc})"


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or "cpu"


def _versions() -> dict:
    v = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception as exc:
        v["triton"] = f"not importable: {type(exc).__name__}"
    return v


def _child_cmd(family, args, path, impl):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", family, "--one-out", path, "--size", args.size,
           "--seq", str(args.seq), "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--memory-impl", impl]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.smoke:
        cmd += ["--smoke"]
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=False, default=os.path.join(BENCH, "results", "train_gpu"),
                   help="output directory")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=("transformer", "hope", "titans",
                                                                            "gated_deltanet", "hope_attention"))
    p.add_argument("--size", default="760m")
    p.add_argument("--layers", type=int, default=0, help="layers (default: the preset's, 24 for 760m)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", default=None, help="micro-batch sizes to try, largest first (default 4,2,1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--memory-impl", default="auto", choices=("auto", "torch", "triton", "reference"))
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds for all families together; each child gets its share and is killed past it")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny config (d 64, 2 layers, 128 tokens): seconds")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-out", help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else dict(seq=4096, batch="4,2,1", warmup=3, steps=5)
    args.seq = args.seq or d["seq"]
    args.batch = args.batch or d["batch"]
    args.warmup = d["warmup"] if args.warmup is None else args.warmup
    args.steps = d["steps"] if args.steps is None else args.steps
    if args.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    from common import write_json
    if args.one:                                             # child: one family
        try:
            res = bench_family(args.one, args)
        except Exception as exc:
            import traceback
            traceback.print_exc()
            res = dict(family=args.one, error=f"{type(exc).__name__}: {str(exc)[:1000]}")
        res["versions"] = _versions()
        write_json(args.one_out, res)
        return 0 if "error" not in res else 1

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    # the baseline first; HOPE gets the larger share (its steps are slower, its first step compiles Triton)
    shares = {f: (0.35 if f == "transformer" else 1.0) for f in args.families}
    result = dict(versions=_versions(), smoke=args.smoke, size=args.size, seq=args.seq, budget_s=args.budget,
                  families={}, failed=[])
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def child(fam, limit, key, impl):
        path = os.path.join(args.out, f"train_gpu_{key}.json")
        if os.path.exists(path):
            os.remove(path)
        cmd = _child_cmd(fam, args, path, impl) + ["--max-seconds", str(max(5.0, limit - 15))]
        print(f"[train_gpu] {key}: limit {limit:.0f} s: {' '.join(cmd[1:])}", flush=True)
        t1 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        res = json.load(open(path)) if os.path.exists(path) else dict(family=fam, error=f"no result (rc {rc})")
        res["child_rc"], res["child_s"] = rc, round(time.perf_counter() - t1, 1)
        if rc == "timeout":
            res.setdefault("error", f"killed after {limit:.0f} s")
        result["families"][key] = res
        if "error" in res:
            result["failed"].append(key)
        _print(res)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        _ratios(result)
        write_json(os.path.join(args.out, "train_gpu.json"), result)
        return res

    for i, fam in enumerate(args.families):
        left = args.budget - (time.perf_counter() - t0)
        rest = sum(shares[f] for f in args.families[i:])
        res = child(fam, max(10.0, left * shares[fam] / rest), fam, args.memory_impl)
        # a Triton failure (not a timeout, not memory) should not leave HOPE without a number: retry once
        # with the PyTorch memory path, reported separately as "<family>_torch_fallback"
        err = res.get("error", "")
        left = args.budget - (time.perf_counter() - t0) - 5
        later = sum(shares[f] for f in args.families[i + 1:]) / rest * left
        if (err and res.get("child_rc") != "timeout" and "OutOfMemory" not in err and fam != "transformer"
                and args.memory_impl in ("auto", "triton") and left - later > 30):
            child(fam, left - later, f"{fam}_torch_fallback", "torch")
    return 0 if not result["failed"] else 1


def _ratios(result):
    fams = result["families"]
    h, t = fams.get("hope", {}), fams.get("transformer", {})
    if not h.get("tokens_per_s") and fams.get("hope_torch_fallback", {}).get("tokens_per_s"):
        h = fams["hope_torch_fallback"]
    if h.get("tokens_per_s") and t.get("tokens_per_s"):
        result["hope_over_transformer"] = dict(
            hope_memory_impl=h.get("memory_impl"),
            tokens_per_s=round(h["tokens_per_s"] / t["tokens_per_s"], 4),
            mfu=(round(h["mfu"] / t["mfu"], 4) if h.get("mfu") and t.get("mfu") else None),
            peak_mem=(round(h["peak_mem_gib"] / t["peak_mem_gib"], 4) if h.get("peak_mem_gib") and t.get("peak_mem_gib")
                      else None),
            same_batch=h.get("batch") == t.get("batch"))


def _print(r):
    if "error" in r:
        print(f"[train_gpu] {r.get('family')}: FAILED: {r['error']}", flush=True)
        return
    mfu = f", MFU {100 * r['mfu']:.1f}% (6N: {100 * r['mfu_dense_6N']:.1f}%)" if r.get("mfu") else ""
    mem = f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else ""
    print(f"[train_gpu] {r['family']}: batch {r['batch']} x {r['seq']}, {r['median_step_s']:.3f} s/step, "
          f"{r['tokens_per_s']:,.0f} tok/s{mfu}{mem} ({r['memory_impl']})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
