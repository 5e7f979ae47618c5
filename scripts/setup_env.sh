#!/usr/bin/env bash
# Create .venv (once) and install the package. Usage: scripts/setup_env.sh [extras], e.g. "dev".
# CPU machines pin torch==2.13.0 through constraints-cpu.txt (otherwise pip pulls a multi-GB CUDA
# build); on a GPU cluster set NL_CONSTRAINTS="" (or your own file) and install the "gpu" extra.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
constraints="${NL_CONSTRAINTS-constraints-cpu.txt}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
stamp=".venv/.installed-$(cat pyproject.toml "${constraints:-/dev/null}" | sha1sum | cut -c1-12)-${extras:-base}"
if [ ! -f "$stamp" ]; then
    echo "installing nl-pretrain${extras:+ [$extras]} into .venv (first time: ~2 minutes)"
    DS_BUILD_OPS=0 .venv/bin/pip install -q ${constraints:+-c "$constraints"} -e "$spec"
    touch "$stamp"
fi
