#!/usr/bin/env bash
# Install what the tests need and run them (the README's test command; .ci/run calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,ray,eval,hf
export DS_ACCELERATOR=cpu RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
