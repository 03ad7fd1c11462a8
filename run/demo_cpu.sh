#!/usr/bin/env bash
# The README demo, end to end on CPU: embedded MedQuAD sample -> indexed dataset -> TP=2 finetune
# on 2 CPU processes -> HF export (with logit check) -> generation -> the report, side by side for
# the megatron-core checkpoint (TP=2), its HF export and the retrieval and echo baselines.
#   bash run/demo_cpu.sh         # DEMO_ITERS=120 by default; DEMO_OUT=runs/demo
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
ITERS=${DEMO_ITERS:-120}
NEW_TOKENS=${DEMO_NEW_TOKENS:-48}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Start clean, but only over a folder an earlier demo made (it leaves a marker file there).
if [[ -e "$OUT" ]]; then
  if [[ -f "$OUT/.megatron_yuyuan_demo" ]]; then
    rm -rf "$OUT"
  elif [[ -n "$(ls -A "$OUT")" ]]; then
    echo "error: DEMO_OUT=$OUT exists and was not made by this demo; choose another folder" >&2
    exit 2
  fi
fi
mkdir -p "$OUT" && touch "$OUT/.megatron_yuyuan_demo"

echo "== 1/4 preprocess the embedded MedQuAD sample"
"$PYTHON" -m megatron_yuyuan preprocess-medquad --output-prefix "$OUT/data/medquad" --valid-size 10 --test-size 10 --no-progress

echo "== 2/4 finetune the 'small' preset with TP=2 on 2 CPU processes"
MASTER_PORT=${MASTER_PORT:-29517} PYTHON="$PYTHON" bash run/finetune_qa.sh --config run/configs/demo_cpu.yaml \
  --train-iters "$ITERS" --lr-warmup-iters "$(( ITERS / 12 ))" --data-prefix "$OUT/data/medquad" --load "$OUT/checkpoints" \
  --save "$OUT/checkpoints" --save-interval "$ITERS" --eval-interval "$ITERS" \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard"

echo "== 3/4 export to Hugging Face format and check logits"
"$PYTHON" -m megatron_yuyuan to-hf --load "$OUT/checkpoints" --out "$OUT/hf" --verify

echo "== 4/4 answer the test questions and score them (megatron-core at TP=2, and the HF export)"
"$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-port "$(( ${MASTER_PORT:-29517} + 1 ))" \
  -m megatron_yuyuan.eval_qa --load "$OUT/checkpoints" --tensor-model-parallel-size 2 \
  --references "$OUT/data/medquad_test.jsonl" --out "$OUT/eval" --name megatron-tp2 --max-new-tokens "$NEW_TOKENS" \
  --train-data "$OUT/data/medquad_train.jsonl"
"$PYTHON" -m megatron_yuyuan eval --hf-dir "$OUT/hf" --references "$OUT/data/medquad_test.jsonl" \
  --out "$OUT/eval" --name hf-export --max-new-tokens "$NEW_TOKENS" --train-data "$OUT/data/medquad_train.jsonl"
echo "== report: $OUT/eval/report.md (loss curve: $OUT/checkpoints/loss_curve.png)"
