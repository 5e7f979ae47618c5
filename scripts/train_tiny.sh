#!/usr/bin/env bash
# The README's main job: install, prepare the default corpus (once), train the tiny HOPE preset.
# Extra arguments go to `nl-pretrain train`, e.g. --train.steps=100 or --model.preset=transformer-tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/nl-pretrain train --config configs/tiny_hope.yaml "$@"
