#!/usr/bin/env bash
# The CPU recipe: the full public MedQuAD -> indexed dataset -> finetune run/configs/medquad_cpu.yaml
# on this machine's CPUs -> answer the 500 held-out test questions -> report with the retrieval and
# echo baselines, 95% bootstrap intervals and examples. About 55 minutes on 2 CPU cores.
#   git clone https://github.com/abachaa/MedQuAD data/MedQuAD     # the raw XML (CC BY 4.0)
#   bash run/medquad_cpu.sh [MEDQUAD_DIR] [OUT]                   # defaults: data/MedQuAD runs/medquad_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
MEDQUAD=${1:-data/MedQuAD}
OUT=${2:-runs/medquad_cpu}
PYTHON=${PYTHON:-python}
NEW_TOKENS=${NEW_TOKENS:-128}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
if [[ ! -d "$MEDQUAD" ]]; then
  echo "error: $MEDQUAD not found; get MedQuAD with: git clone https://github.com/abachaa/MedQuAD $MEDQUAD" >&2
  exit 2
fi
if [[ -e "$OUT" && -n "$(ls -A "$OUT")" ]]; then
  echo "error: $OUT exists and is not empty; choose another OUT (second argument) or remove it" >&2
  exit 2
fi
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "1/3 preprocess $MEDQUAD (leakage-free split: 500 validation, 500 test pairs)"
"$PYTHON" -m tools.preprocess_medquad --input "$MEDQUAD" --output-prefix "$OUT/data/medquad" --no-progress

stamp "2/3 finetune run/configs/medquad_cpu.yaml ($OMP_NUM_THREADS threads)"
"$PYTHON" -m megatron_yuyuan.finetune --config run/configs/medquad_cpu.yaml \
  --data-prefix "$OUT/data/medquad" --save "$OUT/checkpoints" \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard"

stamp "3/3 answer the test split and score it next to the baselines"
"$PYTHON" -m megatron_yuyuan.eval_qa --load "$OUT/checkpoints" --name medquad-cpu \
  --references "$OUT/data/medquad_test.jsonl" --train-data "$OUT/data/medquad_train.jsonl" \
  --out "$OUT/eval" --max-new-tokens "$NEW_TOKENS" --no-repeat-ngram-size 4 --batch-size 16
stamp "done: report $OUT/eval/report.md, answers side by side $OUT/eval/examples.md"
