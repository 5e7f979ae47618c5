#!/usr/bin/env bash
# One node, N processes, the same `nl-pretrain train` entry point and config as a single-process run.
#   launch/local.sh -n 2 --config configs/tiny_hope.yaml --parallel.tensor=2
#   LAUNCHER=deepspeed launch/local.sh -n 8 --config ... --parallel.zero_stage=2
# CPU or GPU: gloo on CPU, NCCL when CUDA is visible (chosen by nl_pretrain.parallel.topology).
# Env: LAUNCHER=torchrun|deepspeed (default torchrun), MASTER_PORT (default 29500),
#      THREADS per process (default: cores / N, at least 1), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=1
if [ "${1:-}" = "-n" ]; then NPROC="$2"; shift 2; fi
PYTHON="${PYTHON:-.venv/bin/python}"
PORT="${MASTER_PORT:-29500}"
CORES="$(nproc)"
THREADS="${THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
export OMP_NUM_THREADS="$THREADS" DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
case "${LAUNCHER:-torchrun}" in
  torchrun)
    CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" --master_port "$PORT"
         -m nl_pretrain.cli train "$@") ;;
  deepspeed)
    # the DeepSpeed launcher runs a script, not a module: nl_pretrain/cli.py is one
    CMD=("$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank
         nl_pretrain/cli.py train "$@") ;;
  *) echo "LAUNCHER must be torchrun or deepspeed, not '${LAUNCHER}'" >&2; exit 2 ;;
esac
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
