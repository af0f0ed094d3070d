#!/usr/bin/env bash
# InfLLM v2 on one GPU (made for an H200): checks the pallas_gpu kernels against the reference, then times
# sparse vs cuDNN attention at 32K/64K/128K, forward and forward+backward, and prints a table.
# Uses the machine's python3 (it needs a CUDA jax); extra flags go to check_gpu.py, e.g. --seq 32768.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" -m experiments.device.check_gpu "$@"
