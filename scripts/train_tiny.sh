#!/usr/bin/env bash
# The README's main job: install, prepare the default corpus (once), train the tiny HOPE preset.
# Extra arguments go to `nl-pretrain train`, e.g. --train.steps=100 or --model.preset=transformer-tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
if [ ! -f data/stdlib-4k/manifest.json ]; then
    .venv/bin/nl-pretrain prepare-data --source default --out data/stdlib-4k --vocab-size 4096 --seq-len 256
fi
exec .venv/bin/nl-pretrain train --config configs/tiny_hope.yaml "$@"
