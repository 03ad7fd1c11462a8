#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): environment, cuda-marked tests, bf16 throughput and
# MFU (1.3B and yuyuan-3.5b), fp32 GPU-vs-CPU loss parity, generation parity and speed.
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--iters N]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
