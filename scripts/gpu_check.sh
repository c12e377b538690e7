#!/usr/bin/env bash
# Check one CUDA GPU in under 8 minutes: attention backends agree, 1.1B dense and MoE training-step speed (eager and
# compiled), grouped-matmul MoE agrees. Prints markdown tables and writes them with JSON to --out (runs/gpu_check).
#   bash scripts/gpu_check.sh [--out DIR] [--sections attention,moe,training] [--budget SECONDS]
# PYTHON selects the interpreter (default: python). Installs and downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.gpu_check "$@"
