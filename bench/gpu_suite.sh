#!/usr/bin/env bash
# One command for a bare single-GPU machine (Python + torch + triton + numpy, pyyaml, safetensors,
# tokenizers, tqdm, einops, tensorboard; no deepspeed / megatron-core / ray / webdataset / flash-attn,
# maybe no pytest, no network), run from anywhere, in under 8 minutes:
#
#   bash bench/gpu_suite.sh OUT_DIR
#
#   a. GPU tests (-m gpu tests/kernels tests/model): pytest when it imports (junit XML -> JSON), else a
#      tiny built-in runner (a pytest stand-in that expands parametrize and honours skipif/skip)
#      -> OUT_DIR/gpu_tests.json (one entry per test: outcome, seconds, message)
#   b. bench/kernels.py (memory kernels vs fla's chunk_gated_delta_rule when fla imports)
#      -> OUT_DIR/kernels.json
#   c. bench/train_gpu.py: HOPE-760M vs Transformer++-760M training steps at 4K, bf16
#      -> OUT_DIR/train_gpu.json (+ train_gpu_<family>.json)
#   -> OUT_DIR/env.json (versions, nvidia-smi), OUT_DIR/<step>.log, OUT_DIR/summary.json (what ran,
#      rc, seconds, what failed or timed out, the headline numbers)
#
# Every step has its own timeout and the suite goes on past failures. Environment:
#   PYTHON (default python3, or .venv/bin/python if present), BUDGET_S (total, default 465),
#   T_TESTS / T_KERNELS / T_TRAIN (per-step limits, default 150 / 110 / 195),
#   TRAIN_ARGS (extra arguments for train_gpu.py, e.g. "--layers 12 --batch 2,1"), KERNEL_REPS (default 5),
#   FLA_PATH (a directory holding the fla package, or an fla wheel; else shared/wheels/*.whl is used),
#   GPU_SUITE_STEPS (default "tests kernels train"), GPU_SUITE_NO_PYTEST=1 (force the built-in runner),
#   GPU_SUITE_TEST_PATHS (default "tests/kernels tests/model").
set -u
OUT="${1:?usage: bash bench/gpu_suite.sh OUT_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
BUDGET_S="${BUDGET_S:-465}"
STEPS="${GPU_SUITE_STEPS:-tests kernels train}"
TEST_PATHS="${GPU_SUITE_TEST_PATHS:-tests/kernels tests/model}"
START=$(date +%s)
STEPS_TSV="$OUT/.steps.tsv"
: > "$STEPS_TSV"
# The repo root is NOT put on PYTHONPATH: every entry point finds it itself (cwd, conftest, sys.path
# inserts), and bench/kernels.py, run as a script with the root on PYTHONPATH behind its own folder,
# would import itself as the package `kernels` ("'kernels' is not a package").
export PYTHONPATH="${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

# ---- fla (flash-linear-attention), a pure-Python wheel, for bench/kernels.py's comparison ----------
FLA_NOTE="not found"
add_wheel() {   # unpack a wheel (a zip) into OUT/_deps and put it on PYTHONPATH
  local whl="$1" dst="$OUT/_deps"
  mkdir -p "$dst"
  if "$PYTHON" -m zipfile -e "$whl" "$dst" 2>/dev/null; then
    export PYTHONPATH="$dst${PYTHONPATH:+:$PYTHONPATH}"; FLA_NOTE="wheel $whl"
  else
    FLA_NOTE="could not unpack $whl"
  fi
}
if [ -n "${FLA_PATH:-}" ]; then
  if [ -d "$FLA_PATH" ]; then export PYTHONPATH="$FLA_PATH${PYTHONPATH:+:$PYTHONPATH}"; FLA_NOTE="dir $FLA_PATH"
  elif [ -f "$FLA_PATH" ]; then add_wheel "$FLA_PATH"
  else FLA_NOTE="FLA_PATH=$FLA_PATH does not exist"; fi
else
  for whl in "$ROOT"/shared/wheels/fla*.whl "$ROOT"/shared/wheels/flash_linear_attention*.whl; do
    [ -f "$whl" ] && add_wheel "$whl"
  done
fi
echo "[gpu_suite] root $ROOT, out $OUT, python $PYTHON, budget ${BUDGET_S}s, fla: $FLA_NOTE"

# ---- environment -------------------------------------------------------------------------------------
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true; } > "$OUT/nvidia-smi.txt"
FLA_NOTE="$FLA_NOTE" timeout 60 "$PYTHON" - "$OUT/env.json" <<'EOF' || echo "[gpu_suite] env probe failed"
import importlib, importlib.util, json, os, platform, sys
env = dict(python=sys.version.split()[0], platform=platform.platform(), fla_source=os.environ.get("FLA_NOTE"))
for mod in ("torch", "triton", "numpy", "yaml", "pytest", "fla"):
    try:
        m = importlib.import_module(mod)
        env[mod] = getattr(m, "__version__", "imported")
    except Exception as exc:
        env[mod] = f"not importable ({type(exc).__name__}: {str(exc)[:120]})"
for mod in ("flash_attn", "deepspeed", "megatron", "ray", "webdataset"):   # heavy: only whether they exist
    try:
        env[mod] = "present" if importlib.util.find_spec(mod) is not None else "absent"
    except Exception as exc:
        env[mod] = f"absent ({type(exc).__name__})"
try:
    import torch
    env["cuda_available"] = torch.cuda.is_available()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env["cuda"] = torch.version.cuda
except Exception as exc:
    env["torch_error"] = repr(exc)
env["nvidia_smi"] = open(os.path.join(os.path.dirname(sys.argv[1]), "nvidia-smi.txt")).read().strip()
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("[gpu_suite] env:", json.dumps(env))
EOF

# ---- the step runner ---------------------------------------------------------------------------------
run_step() {   # run_step NAME LIMIT_S CMD... : log to OUT/NAME.log, record rc and seconds
  local name="$1" limit="$2"; shift 2
  local now left t0 rc
  now=$(date +%s); left=$(( BUDGET_S - (now - START) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0\t0\t%s\n' "$name" "budget spent" >> "$STEPS_TSV"
    echo "[gpu_suite] $name: skipped (budget spent)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_suite] $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - t0 )) status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$*" >> "$STEPS_TSV"
  tail -n 5 "$OUT/$name.log" | sed "s/^/[gpu_suite]   $name| /"
  echo "[gpu_suite] $name: $status (rc $rc, ${secs}s)"
}

# ---- a. GPU tests ------------------------------------------------------------------------------------
RUNNER="$OUT/_gpu_test_runner.py"
cat > "$RUNNER" <<'EOF'
"""GPU tests -> gpu_tests.json: pytest (junit XML) when it imports, else a minimal pytest stand-in."""
import importlib.util, itertools, json, os, subprocess, sys, time, traceback, types
import xml.etree.ElementTree as ET

out_json, paths = sys.argv[1], sys.argv[2:]
root = os.getcwd()


def write(result):
    tests = result["tests"]
    for k in ("passed", "failed", "skipped", "error"):
        result[k] = sum(t["outcome"] == k for t in tests)
    tmp = out_json + ".tmp"
    json.dump(result, open(tmp, "w"), indent=1)
    os.replace(tmp, out_json)
    print(f"gpu tests ({result['runner']}): {result['passed']} passed, {result['failed']} failed, "
          f"{result['skipped']} skipped, {result['error']} errors")


def with_pytest():
    xml = out_json[:-5] + ".xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
           f"--junitxml={xml}", *paths]
    rc = subprocess.call(cmd)
    if rc in (2, 3, 4):           # interrupted / internal / usage error (e.g. a collection error): no results
        print(f"pytest exited with {rc}; running the tests with the built-in runner instead", flush=True)
        return without_pytest()
    tests = []
    if os.path.exists(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    msg = (el.get("message") or "")[:500]
            tests.append(dict(id=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                              seconds=float(case.get("time") or 0), message=msg))
    result = dict(runner="pytest", rc=rc, tests=tests)
    write(result)
    return 0 if rc in (0, 5) and not result["failed"] and not result["error"] else 1   # 5: none collected


class Skipped(Exception):
    pass


class _Mark:
    """pytest.mark.NAME: usable bare (in pytestmark lists, as a decorator) or called with arguments."""

    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:     # decorating a test
            args[0].__dict__.setdefault("_marks", []).append(self)
            return args[0]
        return _Mark(self.name, args, kwargs)


class _MarkGen:
    def __getattr__(self, name):
        return _Mark(name)


def stub_pytest():
    m = types.ModuleType("pytest")
    m.mark = _MarkGen()
    m.Skipped = Skipped

    def skip(reason="", **kw):
        raise Skipped(reason)

    def importorskip(name, *a, **kw):
        try:
            return importlib.import_module(name)
        except Exception as exc:
            raise Skipped(f"could not import {name!r}: {exc}")

    def fixture(*a, **kw):
        return a[0] if a and callable(a[0]) else (lambda f: f)

    import contextlib

    @contextlib.contextmanager
    def raises(exc, match=None):
        try:
            yield
        except exc:
            return
        raise AssertionError(f"did not raise {exc}")

    m.skip, m.importorskip, m.fixture, m.raises = skip, importorskip, fixture, raises
    m.param = lambda *values, id=None, marks=(): values if len(values) > 1 else values[0]
    sys.modules["pytest"] = m


def expand(fn):
    """(id suffix, kwargs) for every parametrize combination; the decorator nearest the function first."""
    sets = [mk for mk in fn.__dict__.get("_marks", []) if mk.name == "parametrize"]
    axes = []
    for mk in sets:
        names = [n.strip() for n in (mk.args[0].split(",") if isinstance(mk.args[0], str) else mk.args[0])]
        values = list(mk.args[1])
        ids = mk.kwargs.get("ids")
        entries = []
        for i, v in enumerate(values):
            vals = v if len(names) > 1 else (v,)
            if callable(ids):
                label = "-".join(str(ids(x)) for x in vals)
            elif ids is not None:
                label = str(list(ids)[i])
            else:
                label = "-".join(str(x) if isinstance(x, (int, float, str, bool)) else f"{names[j]}{i}"
                                 for j, x in enumerate(vals))
            entries.append((label, dict(zip(names, vals))))
        axes.append(entries)
    if not axes:
        return [("", {})]
    combos = []
    for combo in itertools.product(*axes):       # pytest ids: the decorator nearest the function first
        kwargs = {}
        for _, kw in combo:
            kwargs.update(kw)
        combos.append(("[" + "-".join(lbl for lbl, _ in combo) + "]", kwargs))
    return combos


def marks_of(obj):
    own = obj.__dict__.get("_marks", []) if hasattr(obj, "__dict__") else []
    return own


def without_pytest():
    stub_pytest()
    sys.path.insert(0, root)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.startswith("test_") and f.endswith(".py"))
        else:
            files.append(p)
    tests = []
    result = dict(runner="builtin (pytest not importable)", tests=tests)
    for path in files:
        rel = os.path.relpath(path, root)
        try:
            spec = importlib.util.spec_from_file_location(rel.replace("/", ".")[:-3], path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except Exception as exc:
            tests.append(dict(id=rel, outcome="error", seconds=0.0, message=f"import: {type(exc).__name__}: {exc}"[:500]))
            continue
        mod_marks = getattr(mod, "pytestmark", [])
        mod_marks = mod_marks if isinstance(mod_marks, list) else [mod_marks]
        for name in dir(mod):
            fn = getattr(mod, name)
            if not (name.startswith("test_") and callable(fn)):
                continue
            marks = mod_marks + marks_of(fn)
            if not any(mk.name == "gpu" for mk in marks):
                continue
            for suffix, kwargs in expand(fn):
                tid = f"{rel}::{name}{suffix}"
                t0 = time.perf_counter()
                outcome, msg = "passed", ""
                skip = [mk for mk in marks if mk.name == "skipif" and mk.args and mk.args[0] is True]
                if not torch.cuda.is_available():  # tests/conftest.py: gpu tests skip without CUDA
                    outcome, msg = "skipped", "needs a CUDA device"
                elif skip:
                    outcome, msg = "skipped", str(skip[0].kwargs.get("reason", ""))
                else:
                    torch.manual_seed(0)          # tests/conftest.py's autouse fixture
                    try:
                        fn(**kwargs)
                    except Skipped as exc:
                        outcome, msg = "skipped", str(exc)
                    except Exception as exc:
                        outcome = "failed"
                        msg = f"{type(exc).__name__}: {exc}"[:300] + " | " + traceback.format_exc()[-700:]
                tests.append(dict(id=tid, outcome=outcome, seconds=round(time.perf_counter() - t0, 3), message=msg))
                print(f"{outcome.upper():8s} {tid} ({time.perf_counter() - t0:.1f}s) {msg[:200]}", flush=True)
                write(result)                      # partial results survive a timeout
    write(result)
    return 1 if result["failed"] or result["error"] else 0


use_pytest = os.environ.get("GPU_SUITE_NO_PYTEST", "0") in ("", "0")
if use_pytest:
    try:
        import pytest  # noqa: F401
    except Exception:
        use_pytest = False
sys.exit(with_pytest() if use_pytest else without_pytest())
EOF

for step in $STEPS; do
  case "$step" in
    tests)   run_step gpu_tests "${T_TESTS:-150}" "$PYTHON" "$RUNNER" "$OUT/gpu_tests.json" $TEST_PATHS ;;
    kernels) run_step kernels "${T_KERNELS:-110}" "$PYTHON" bench/kernels.py --reps "${KERNEL_REPS:-5}" --out "$OUT/kernels.json" ;;
    train)   # shellcheck disable=SC2086
             run_step train_gpu "${T_TRAIN:-195}" "$PYTHON" bench/train_gpu.py --out "$OUT" \
               --budget "$(( ${T_TRAIN:-195} - 10 ))" ${TRAIN_ARGS:-} ;;
    *) echo "[gpu_suite] unknown step '$step' (tests kernels train)" ;;
  esac
done

# ---- summary -----------------------------------------------------------------------------------------
"$PYTHON" - "$OUT" "$STEPS_TSV" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, sys
out, tsv, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []
for line in open(tsv):
    name, status, rc, secs, cmd = line.rstrip("\n").split("\t", 4)
    steps.append(dict(name=name, status=status, rc=int(rc), seconds=int(secs), cmd=cmd, log=f"{name}.log"))


def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None


summary = dict(wall_s=wall, steps=steps, ran=[s["name"] for s in steps if s["status"] != "skipped"],
               failed=[s["name"] for s in steps if s["status"] in ("failed", "timeout")],
               skipped=[s["name"] for s in steps if s["status"] == "skipped"], env=load("env.json"))
t = load("gpu_tests.json")
if t:
    summary["gpu_tests"] = {k: t.get(k) for k in ("runner", "passed", "failed", "skipped", "error")}
    summary["gpu_tests"]["failed_ids"] = [x["id"] for x in t["tests"] if x["outcome"] in ("failed", "error")]
k = load("kernels.json")
if k:
    summary["kernels"] = [{f: r.get(f) for f in ("shape", "case", "impl", "fwd_bwd_ms", "tflops", "error")}
                          for r in k.get("rows", [])]
g = load("train_gpu.json")
if g:
    summary["train"] = {f: {x: r.get(x) for x in ("batch", "tokens_per_s", "mfu", "mfu_dense_6N", "peak_mem_gib",
                                                   "memory_impl", "error")}
                        for f, r in g.get("families", {}).items()}
    summary["train"]["hope_over_transformer"] = g.get("hope_over_transformer")
    if g.get("failed"):
        summary["failed"].append("train_gpu:" + ",".join(g["failed"]))
tmp = os.path.join(out, "summary.json.tmp")
json.dump(summary, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, "summary.json"))
print(json.dumps(summary, indent=1)[:4000])
EOF
echo "[gpu_suite] done in $(( $(date +%s) - START ))s; results in $OUT"
