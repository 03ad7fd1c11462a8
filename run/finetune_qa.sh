#!/usr/bin/env bash
""":"
# This file is both a shell script and a Python script, so both launches users type work:
#
#   bash run/finetune_qa.sh ARGS                      # the wrapper: starts torchrun itself
#   torchrun --nproc-per-node 8 run/finetune_qa.sh ARGS   # torchrun runs this file with Python
#
# To bash, the first line below the shebang is the no-op command ':' and everything up to `exec`
# is the launcher; to Python, it all is one string literal and the code at the bottom runs.
#
# One machine, or one call per machine (NODE_RANK 0..NNODES-1, same MASTER_ADDR everywhere):
#   bash run/finetune_qa.sh --config run/configs/demo_cpu.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash run/finetune_qa.sh --config run/configs/yuyuan_3.5b_medquad.yaml
# On Slurm: sbatch run/slurm/finetune_qa.sbatch (sets these from Slurm's variables).
#
# Environment (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1, required when
# NNODES > 1), MASTER_PORT (29500), NPROC_PER_NODE (the GPUs CUDA_VISIBLE_DEVICES or nvidia-smi
# shows, else 2 CPU processes), PYTHON (python). FINETUNE_DRY_RUN=1 prints the command only.
# Checkpoints (--save/--load) and data must be on a filesystem every node sees.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
need_int() {  # NAME VALUE MIN: a whole number >= MIN, else one error line
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (( 10#$2 < $3 )); then
    echo "error: $1=$2 must be a whole number >= $3" >&2
    exit 2
  fi
}
need_int NNODES "$NNODES" 1
need_int NODE_RANK "$NODE_RANK" 0
if (( 10#$NODE_RANK >= 10#$NNODES )); then
  echo "error: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES (0 .. NNODES-1)" >&2
  exit 2
fi
if [[ -n "${NPROC_PER_NODE:-}" ]]; then need_int NPROC_PER_NODE "$NPROC_PER_NODE" 1; fi
if [[ -n "${MASTER_PORT:-}" ]]; then
  need_int MASTER_PORT "$MASTER_PORT" 1
  if (( 10#$MASTER_PORT > 65535 )); then
    echo "error: MASTER_PORT=$MASTER_PORT must be a TCP port (1-65535)" >&2
    exit 2
  fi
fi
if [[ "$NNODES" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  echo "error: NNODES=$NNODES needs MASTER_ADDR (the address of the NODE_RANK=0 machine, the same on every node)" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  gpus=0
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    # what this job may use: "0,1,3" -> 3; "" -> none
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [[ "$gpus" -gt 0 ]]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
  if [[ "$gpus" -eq 0 ]]; then
    # CPU processes: one thread each unless told otherwise (2 processes on a 2-core machine).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
fi

if [[ "$NODE_RANK" -eq 0 && -z "${FINETUNE_DRY_RUN:-}" ]]; then
  # The rendezvous listens on MASTER_PORT here: a port another job holds would fail later
  # with a traceback per process.
  if ! "$PYTHON" - "$MASTER_ADDR" "$MASTER_PORT" <<'PY' 2>/dev/null; then
import socket, sys
try:
    socket.socket().bind(("", int(sys.argv[2])))  # every address: what the rendezvous takes
except OSError:
    sys.exit(1)
PY
    echo "error: MASTER_PORT=$MASTER_PORT is already in use on this machine (another run?); set MASTER_PORT to a free port" >&2
    exit 2
  fi
fi

cmd=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     -m megatron_yuyuan.finetune "$@")
echo "+ ${cmd[*]}"
if [[ -n "${FINETUNE_DRY_RUN:-}" ]]; then exit 0; fi
# A preemption (SIGTERM) or Slurm's warning before the time limit (SIGUSR1) is for the training
# processes only: each finishes its step, saves it and exits 0, and torchrun then exits 0 too.
# torchrun itself ignores both (it would stop its workers after 30 s and fail, or die of SIGUSR1):
# it starts with them ignored and without its own SIGTERM handler, in a session of its own; the
# workers set their handlers (their default action when --no-exit-signal-handler). This script
# passes both on, also when only it is signalled (Slurm's `--signal=B:...`); Ctrl-C goes to the
# whole torchrun session, as before.
if ! command -v pgrep >/dev/null 2>&1; then
  echo "error: pgrep (package procps) is needed to pass SIGTERM/SIGUSR1 to the training processes" >&2
  exit 2
fi
( trap '' TERM USR1
  export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # torchrun --signals-to-handle (older: no-op)
  exec setsid "${cmd[@]}" ) &
launcher=$!
workers() { pgrep -P "$launcher" 2>/dev/null || true; }
trapped=0
trap 'trapped=1; kill -TERM $(workers) 2>/dev/null || true' TERM
trap 'trapped=1; kill -USR1 $(workers) 2>/dev/null || true' USR1
trap 'trapped=1; kill -INT -- "-$launcher" 2>/dev/null || true' INT
while true; do
  trapped=0
  wait "$launcher" && status=0 || status=$?
  if [[ $trapped == 0 || $status -le 128 ]]; then break; fi  # torchrun's own exit status
  if kill -0 "$launcher" 2>/dev/null; then continue; fi  # a signal ended the wait: wait on
  wait "$launcher" 2>/dev/null && status=0 || status=$?  # it exited as the trap ran
  break
done
exit "$status"
":"""

# Python: a torchrun worker (torchrun set RANK, WORLD_SIZE, MASTER_ADDR ...): run the finetune.
import sys

from megatron_yuyuan.cli.finetune import main

sys.exit(main(sys.argv[1:]))
