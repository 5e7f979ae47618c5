"""Device kernels launched by ONE layer's training step (forward + backward of one ``Block``).

    python bench/launches.py                          # every family x memory_impl, T = 256 1024 4096
    python bench/launches.py --T 256 1024 --families hope transformer
    python bench/launches.py --triton-exec real       # run the Triton kernels at every T (slow)

For every family (hope, hope_attention, transformer, titans, gated_deltanet) and every
``memory_impl`` that applies (``torch``; ``triton`` in the Triton interpreter on CPU; the
attention-only Transformer++ has no memory, its row is labelled ``-``), one
:class:`nl_pretrain.model.model.Block` with the 760m preset's structure (16 heads, chunk 64, its
CMS levels: ``preset_model_dict(f"{family}-760m")``) at a tiny width (``d_model = 256``, so
``d_h = 16``; the number of launches does not depend on the width), batch 1, fp32, runs one
forward and one backward (a fixed cotangent for the block output, the block input requires grad,
as it does inside a model). Before the counted step, a short warm-up step (T = 128) takes the
one-time work (Triton's AST rewrite, lazy inits) out of the count.

What is counted (CPU, no GPU needed):

(a) ATen ops that launch a kernel, from ``torch.profiler``: every ``aten::`` event none of whose
    descendants is a non-metadata ``aten::`` op (a leaf of the op tree: composite ops such as
    ``linear`` or ``reshape`` are counted through the ops they call; ``mm``, whose only children
    are ``resolve_conj`` flags, is a leaf), plus the few ops in :data:`SELF_KERNEL_OPS` that run a
    kernel of their own after calling others, minus the metadata-only ops in :data:`METADATA_OPS`
    (views, allocations, no-op conversions), minus everything that runs inside a Triton launch.
(b) Triton kernel launches, counted at the launcher: ``JITFunction.run`` (compiled kernels) and
    ``InterpretedFunction.run`` (``TRITON_INTERPRET=1``) are wrapped, and every launch runs inside
    ``torch.profiler.record_function("triton_launch")``; the ATen ops the interpreter executes
    inside it (host copies of the arguments, ...) are dropped from (a).

Triton rows with T > 256 are "dry" by default (``--triton-exec auto``): the launches are counted
but the kernels do not run (the interpreter runs every program in numpy, ~200 s for HOPE at T = 256
on this 2-core machine, hours for the whole table); the host code around them runs as usual. That
is exact as long as no host code branches on a kernel's output values, which the run checks: every
family's dry count is compared with its real count at T = 256 (``dry_checks`` in the JSON).

The total is (a) + (b). On a GPU, the CPU's ATen decomposition is close to, not identical with,
the CUDA one (e.g. SDPA is one ``_scaled_dot_product_flash_attention_for_cpu`` op here, one
flash kernel there; cuBLAS may split a matmul), so read the counts as +-a few percent.

Triton rows need ``TRITON_INTERPRET=1`` before Python starts: without it, the script re-executes
itself with it set (one command gives the whole table). Prints a markdown table and writes
``bench/results/launches.json`` (atomically, with the machine info).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
if ROOT in sys.path:          # the repo root first: bench/kernels.py must not shadow the kernels package
    sys.path.remove(ROOT)
sys.path.insert(0, ROOT)
if BENCH not in sys.path:
    sys.path.append(BENCH)    # bench/common.py

FAMILIES = ("hope", "hope_attention", "transformer", "titans", "gated_deltanet")
NO_MEMORY = ("transformer",)            # attention only: memory_impl does not apply
DEFAULT_T = (256, 1024, 4096)
D_MODEL = 256                           # 16 heads -> d_h = 16; the count does not depend on the width
WARMUP_T = 128
# Triton rows with T above this are "dry" by default (launches counted, kernel bodies not run): the
# interpreter runs every program in numpy and took ~200 s for HOPE's real row at T = 256 here.
REAL_MAX_T = 256
TARGETS = {  # launches per layer and training step that the chunk loops inside kernels should reach
    "hope": "<= 600",
    "titans": "<= 400",
    "gated_deltanet": "<= 400",
    "hope_attention": "<= 400",
    "transformer": "~290",
}

# ATen ops that never launch a device kernel, dropped from the leaf count. A leaf ``aten::`` event
# (no ``aten::`` child) that is not in this list is counted as one kernel.
METADATA_OPS = frozenset({
    # views: new strides/offsets on the same storage
    "aten::view", "aten::_unsafe_view", "aten::view_as", "aten::reshape", "aten::_reshape_alias",
    "aten::expand", "aten::expand_as", "aten::broadcast_to", "aten::permute", "aten::transpose",
    "aten::transpose_", "aten::t", "aten::t_", "aten::unsqueeze", "aten::unsqueeze_", "aten::squeeze",
    "aten::squeeze_", "aten::slice", "aten::select", "aten::narrow", "aten::as_strided",
    "aten::as_strided_", "aten::alias", "aten::detach", "aten::detach_", "aten::split",
    "aten::split_with_sizes", "aten::unbind", "aten::chunk", "aten::diagonal", "aten::unfold",
    "aten::movedim", "aten::flatten", "aten::unflatten", "aten::real", "aten::view_as_real",
    "aten::view_as_complex", "aten::numpy_T", "aten::matrix_H", "aten::mT", "aten::mH",
    # conjugate / negative bits (lazy flags; a copy would show up as its own copy_ leaf)
    "aten::resolve_conj", "aten::resolve_neg", "aten::_conj", "aten::conj", "aten::_neg_view",
    # allocations without initialisation (zeros / ones show up as their fill_ / zero_ leaf)
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::resize_", "aten::_resize_output_",
    # no-op conversions (a real conversion has an _to_copy / copy_ child, which is counted)
    "aten::to", "aten::type_as", "aten::contiguous", "aten::lift", "aten::lift_fresh",
    "aten::_has_compatible_shallow_copy_type", "aten::set_", "aten::_version",
    # shape / metadata queries
    "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::is_same_size",
    "aten::result_type", "aten::is_nonzero", "aten::_shape_as_tensor", "aten::sym_size",
    "aten::sym_numel", "aten::sym_stride", "aten::is_contiguous",
})
# Ops that run a kernel of their own besides the counted ops they call (so they are counted although
# they are not leaves): the GEMMs copy or transpose an operand first, the triangular solve copies its
# right-hand side into the output, eye zero-fills before writing its diagonal, SDPA's CPU backward
# zero-fills its gradient buffers. Seen in the op trees of all five families (``composite_ops``).
SELF_KERNEL_OPS = frozenset({
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::linalg_solve_triangular",
    "aten::triangular_solve", "aten::eye", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::mkldnn_convolution",
    "aten::convolution_backward",
})
TRITON_SCOPE = "triton_launch"


# -- counting -------------------------------------------------------------------------------------
class _TritonLaunches:
    """Counts Triton launches at the launcher, each one inside ``record_function(TRITON_SCOPE)``."""

    def __init__(self, execute: bool = True):
        self.by_kernel = collections.Counter()
        self.execute = execute          # False: count the launch, do not run the kernel ("dry")

    @contextlib.contextmanager
    def patched(self):
        targets = []
        try:
            from triton.runtime.jit import JITFunction
            targets.append(JITFunction)
        except Exception:  # triton missing: nothing to count
            pass
        try:
            from triton.runtime.interpreter import InterpretedFunction
            targets.append(InterpretedFunction)
        except Exception:
            pass
        saved = []
        for cls in targets:
            orig = cls.__dict__.get("run")
            if orig is None:
                continue
            saved.append((cls, orig))
            cls.run = self._wrap(orig)
        try:
            yield self
        finally:
            for cls, orig in saved:
                cls.run = orig

    def _wrap(self, orig):
        counter = self

        def run(fn_self, *args, **kwargs):
            if kwargs.get("warmup"):
                return orig(fn_self, *args, **kwargs)     # compile only, no launch
            name = getattr(getattr(fn_self, "fn", None), "__name__", None) or getattr(fn_self, "__name__", "?")
            counter.by_kernel[name] += 1
            with torch.profiler.record_function(TRITON_SCOPE):
                return orig(fn_self, *args, **kwargs) if counter.execute else None
        return run


def _aten_kernels(events) -> collections.Counter:
    """Leaf ``aten::`` events outside Triton launches, minus :data:`METADATA_OPS`, by name.

    A leaf is an op none of whose descendants is a non-metadata aten op: ``aten::mm`` (whose only
    children are ``resolve_conj`` bits) is a leaf, ``aten::linear`` (-> ``t``, ``matmul`` -> ``mm``)
    is not. :data:`SELF_KERNEL_OPS` count even when they are not leaves."""
    inside, bearing = {}, {}

    def in_triton(ev):
        chain = []
        found = False
        while ev is not None:
            key = id(ev)
            if key in inside:
                found = inside[key]
                break
            chain.append(key)
            if ev.name == TRITON_SCOPE:
                found = True
                break
            ev = ev.cpu_parent
        for key in chain:
            inside[key] = found
        return found

    def has_kernel_below(ev):            # any descendant that is a non-metadata aten op
        key = id(ev)
        if key not in bearing:
            bearing[key] = any((c.name.startswith("aten::") and c.name not in METADATA_OPS) or has_kernel_below(c)
                               for c in ev.cpu_children)
        return bearing[key]

    out = collections.Counter()
    for ev in events:
        name = ev.name
        if not name.startswith("aten::") or name in METADATA_OPS:
            continue
        if has_kernel_below(ev) and not (name in SELF_KERNEL_OPS and all(c.name != name for c in ev.cpu_children)):
            continue                     # counted through its children (eye -> eye: the inner one counts)
        if in_triton(ev):
            continue
        out[name] += 1
    return out


def composite_ops(events) -> collections.Counter:
    """Non-metadata ``aten::`` ops that are not leaves (counted through their children), by name:
    a check that no op which launches its own kernel besides its children is missed."""
    out = collections.Counter()
    for ev in events:
        if ev.name.startswith("aten::") and ev.name not in METADATA_OPS and any(
                c.name.startswith("aten::") and c.name not in METADATA_OPS for c in ev.cpu_children):
            kids = ",".join(sorted({c.name[6:] for c in ev.cpu_children if c.name.startswith("aten::")}))
            out[f"{ev.name} -> {kids}"] += 1
    return out


def count_fn_launches(fn, execute_triton: bool = True) -> dict:
    """Run ``fn()`` once under the profiler and the Triton launch counter; the kernels it launched.
    ``execute_triton=False`` counts Triton launches without running them (their outputs stay
    uninitialised; valid for counting as long as no host code branches on their values)."""
    from torch.profiler import ProfilerActivity, profile
    tl = _TritonLaunches(execute_triton)
    with tl.patched(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = _aten_kernels(prof.events())
    n_aten, n_triton = sum(aten.values()), sum(tl.by_kernel.values())
    return dict(aten=n_aten, triton=n_triton, total=n_aten + n_triton,
                aten_by_op=dict(aten.most_common()), triton_by_kernel=dict(tl.by_kernel.most_common()))


# -- one layer ------------------------------------------------------------------------------------
def layer_config(family: str, impl: str, d_model: int = D_MODEL):
    """The 760m preset's structure of ``family`` at width ``d_model``, fp32, ``memory_impl=impl``."""
    from nl_pretrain.config import build_config
    from nl_pretrain.presets import preset_model_dict
    m = preset_model_dict(f"{family}-760m")
    m.update(d_model=d_model, memory_impl="torch" if impl == "-" else impl)
    return build_config({"model": m}).model


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def count_layer_launches(family: str, impl: str, T: int, d_model: int = D_MODEL, seed: int = 0,
                         triton_exec: str = "real") -> dict:
    """Kernels launched by forward + backward of one ``Block`` of ``family`` at length ``T``.

    ``impl`` is ``torch``, ``triton`` or ``-`` (no memory: Transformer++; runs as ``torch``).
    ``triton`` on a CPU-only machine needs the interpreter: if ``TRITON_INTERPRET`` is not set in
    this process, the count runs in a subprocess that has it. Returns ``aten``, ``triton``,
    ``total``, per-op breakdowns, the config summary and ``seconds`` (wall time of the row).
    ``triton_exec='dry'`` counts the Triton launches without running the kernels (the interpreter
    runs every program in numpy: ~200 s for HOPE at T = 256 on a loaded 2-core machine); the
    default table checks dry == real at T = 256 for every family."""
    if triton_exec not in ("real", "dry"):
        raise ValueError(f"triton_exec must be 'real' or 'dry', got {triton_exec!r}")
    if impl == "triton" and not _interpreter_on() and not torch.cuda.is_available():
        return _count_in_subprocess(family, impl, T, d_model, seed, triton_exec)
    from nl_pretrain.model.model import Block
    t0 = time.perf_counter()
    cfg = layer_config(family, impl, d_model)
    torch.manual_seed(seed)
    # CPU (the interpreter for triton rows); a CUDA device only for triton rows without the interpreter
    device = torch.device("cuda" if impl == "triton" and not _interpreter_on() else "cpu")
    block = Block(cfg).float().to(device)

    def step(t):
        x = torch.randn(1, t, d_model, device=device, requires_grad=True)
        cot = torch.randn(1, t, d_model, device=device)
        return lambda: torch.autograd.backward(block(x), cot)

    execute = triton_exec == "real"
    tl = _TritonLaunches(execute)
    with tl.patched():
        step(WARMUP_T)()                   # one-time work out of the count
    block.zero_grad(set_to_none=True)
    out = count_fn_launches(step(T), execute_triton=execute)
    out.update(family=family, impl=impl, T=T, d_model=d_model, n_heads=cfg.n_heads,
               chunk_mem=cfg.chunk_mem, chunk_proj=cfg.chunk_proj,
               cms=[f"{lvl.kind}:{lvl.period}" for lvl in cfg.cms], device=device.type,
               triton_exec=triton_exec if impl == "triton" else None,
               seconds=round(time.perf_counter() - t0, 2))
    return out


def _count_in_subprocess(family, impl, T, d_model, seed, triton_exec="real"):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--row", family, impl, str(T), "--d-model", str(d_model),
           "--seed", str(seed), "--triton-exec", triton_exec]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"count of {family}/{impl}/T={T} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the table ------------------------------------------------------------------------------------
def impls_of(family: str, with_triton: bool):
    if family in NO_MEMORY:
        return ["-"]
    return ["torch"] + (["triton"] if with_triton else [])


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def markdown(rows, lengths) -> str:
    head = "| family | memory_impl | " + " | ".join(f"T={t}" for t in lengths) + " | target |"
    lines = [head, "|---|---|" + "---:|" * len(lengths) + "---|"]
    keys = []
    for r in rows:
        if (r["family"], r["impl"]) not in keys:
            keys.append((r["family"], r["impl"]))
    for fam, impl in keys:
        cells = []
        for t in lengths:
            r = next((r for r in rows if (r["family"], r["impl"], r["T"]) == (fam, impl, t)), None)
            if r is None:
                cells.append("skipped")
            elif "error" in r:
                cells.append("error")
            elif r["triton"] or r.get("triton_exec"):
                star = "*" if r.get("triton_exec") == "dry" else ""
                cells.append(f"{r['total']}{star} ({r['aten']} aten + {r['triton']} triton)")
            else:
                cells.append(str(r["total"]))
        lines.append(f"| {fam} | {impl} | " + " | ".join(cells) + f" | {TARGETS[fam]} |")
    return "\n".join(lines)


def _code_version() -> dict:
    """The commit measured and the uncommitted changes under nl_pretrain/ and kernels/ (counts move with them)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            return None
    dirty = git("status", "--porcelain", "--", "nl_pretrain", "kernels")
    return dict(commit=git("rev-parse", "--short", "HEAD"), uncommitted=dirty.splitlines() if dirty else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T),
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_T))})")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--impls", nargs="+", default=["torch", "triton"], choices=["torch", "triton"],
                   help="memory implementations (Transformer++ has none and always runs once)")
    p.add_argument("--triton-exec", default="auto", choices=("auto", "real", "dry"),
                   help=f"triton rows: run the kernels (real), only count their launches (dry), or auto: real "
                        f"up to T={REAL_MAX_T}, dry above, plus a dry row at the smallest real T to check dry == real")
    p.add_argument("--d-model", type=int, default=D_MODEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(BENCH, "results", "launches.json"))
    p.add_argument("--row", nargs=3, metavar=("FAMILY", "IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    if args.row:                                   # one row, JSON on the last line (subprocess mode)
        fam, impl, T = args.row
        mode = "real" if args.triton_exec == "auto" else args.triton_exec
        print(json.dumps(count_layer_launches(fam, impl, int(T), args.d_model, args.seed, mode)))
        return 0

    with_triton = "triton" in args.impls and _triton_importable()
    if with_triton and not _interpreter_on() and not torch.cuda.is_available():
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv_out = list(sys.argv[1:] if argv is None else argv)
        print("re-executing with TRITON_INTERPRET=1 for the triton rows", flush=True)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv_out, env)

    from common import load_average, machine, write_json
    lengths = list(args.T)

    def triton_plan(T):
        if args.triton_exec != "auto":
            return args.triton_exec
        return "real" if T <= REAL_MAX_T else "dry"

    real_ts = [T for T in lengths if triton_plan(T) == "real"]
    check_t = min(real_ts) if (args.triton_exec == "auto" and real_ts and any(triton_plan(T) == "dry" for T in lengths)) else None
    rows, checks = [], []
    load_before, t_all = load_average(), time.perf_counter()

    def one(fam, impl, T, mode):
        try:
            r = count_layer_launches(fam, impl, T, args.d_model, args.seed, mode)
        except Exception as exc:  # record and keep going
            r = dict(family=fam, impl=impl, T=T, triton_exec=mode if impl == "triton" else None,
                     error=f"{type(exc).__name__}: {str(exc)[:500]}")
            print(f"  {fam:15s} {impl:6s} T={T:5d}: {r['error']}", flush=True)
        else:
            tag = f" [{mode}]" if impl == "triton" else ""
            print(f"  {fam:15s} {impl:6s} T={T:5d}: {r['total']:7d} = {r['aten']} aten + "
                  f"{r['triton']} triton{tag}   ({r['seconds']:.1f} s)", flush=True)
        return r

    for fam in args.families:
        impls = ["-"] if fam in NO_MEMORY else [i for i in args.impls if i != "triton" or with_triton]
        for impl in impls:
            for T in lengths:
                rows.append(one(fam, impl, T, triton_plan(T) if impl == "triton" else "real"))
            if impl == "triton" and check_t is not None:
                real = next(r for r in rows if (r["family"], r["impl"], r["T"]) == (fam, impl, check_t))
                dry = one(fam, impl, check_t, "dry")
                ok = "error" not in real and "error" not in dry and real["total"] == dry["total"]
                checks.append(dict(family=fam, T=check_t, real=real.get("total"), dry=dry.get("total"), equal=ok,
                                   dry_seconds=dry.get("seconds"), real_seconds=real.get("seconds")))
                if not ok:
                    print(f"  WARNING: {fam} dry count {dry.get('total')} != real {real.get('total')} at T={check_t}: "
                          "the dry rows of this family are not trustworthy", flush=True)
    table = markdown(rows, lengths)
    if any(r.get("triton_exec") == "dry" for r in rows):
        table += ("\n\n* dry: Triton launches counted without running the kernels (the interpreter is too slow); "
                  f"dry == real at T={check_t}: " + ", ".join(f"{c['family']} {'yes' if c['equal'] else 'NO'}"
                                                         for c in checks))
    print("\n" + table)
    result = dict(
        code=_code_version(), machine=machine(torch.get_num_threads()), load_average_before=load_before, load_average_after=load_average(),
        wall_s=round(time.perf_counter() - t_all, 1), triton_interpreter=_interpreter_on(),
        config=dict(preset="<family>-760m structure", d_model=args.d_model, batch=1, dtype="float32",
                    warmup_T=WARMUP_T, step="forward + backward of one Block, fixed cotangent, input requires grad"),
        counting=("aten = leaf aten:: profiler events (no non-metadata aten:: descendant) plus SELF_KERNEL_OPS, "
                  "minus METADATA_OPS, outside Triton launches; triton = launches counted at JITFunction.run / "
                  "InterpretedFunction.run (each inside record_function('triton_launch'))"),
        metadata_ops=sorted(METADATA_OPS), self_kernel_ops=sorted(SELF_KERNEL_OPS), targets=TARGETS, lengths=lengths,
        triton_exec=args.triton_exec,
        triton_exec_note=(f"triton rows above T={REAL_MAX_T} are dry (launches counted, kernels not run): the CPU "
                          "interpreter took ~200 s for HOPE's real row at T=256 on this 2-core machine (load ~6), so "
                          "T=1024 / 4096 real rows would take 15 min / an hour each; dry == real is checked at "
                          f"T={check_t} (dry_checks); --triton-exec real runs them for real"
                          if args.triton_exec == "auto" else None),
        dry_checks=checks, rows=rows, table=table)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
