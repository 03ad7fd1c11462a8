#!/usr/bin/env bash
# Launch megatron_yuyuan.finetune with torchrun on one or many machines; forwards "$@".
#
#   bash run/finetune_qa.sh --config run/configs/demo_cpu.yaml                  # one machine
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run/finetune_qa.sh --config run/configs/yuyuan_3.5b_medquad.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash run/finetune_qa.sh --config run/configs/yuyuan_3.5b_medquad.yaml
#
# Environment (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# NPROC_PER_NODE (number of GPUs, or 2 CPU processes without GPUs), PYTHON (python).
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [[ "$gpus" -gt 0 ]]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
fi
if [[ "$NPROC_PER_NODE" -gt 0 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  # CPU processes: one thread each unless told otherwise (2 processes on a 2-core machine).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

cmd=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     -m megatron_yuyuan.finetune "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
