#!/usr/bin/env bash
# How run/configs/medquad_cpu.yaml was chosen: train a few model shapes / sequence lengths for the
# same CPU budget on the full MedQuAD train split, answer the first 100 validation questions
# greedily and print held-out ROUGE-L (and BLEU) per shape, so shapes compare per CPU minute.
#   bash benchmarks/cpu_recipe_sweep.sh DATA_PREFIX [OUT]     # ~35 min on 2 cores
# DATA_PREFIX comes from: python -m tools.preprocess_medquad --input MedQuAD --output-prefix P
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:?usage: cpu_recipe_sweep.sh DATA_PREFIX [OUT]}
OUT=${2:-runs/cpu_sweep}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# name  layers hidden heads seq micro-batch iterations   (iterations ~ 7 min each at the measured
# step times: tokens/s falls as hidden grows because the 50257-row output layer grows with it)
SHAPES=(
  "L6-h256-s128 6 256 8 128 32 85"
  "L6-h256-s256 6 256 8 256 16 85"
  "L6-h384-s128 6 384 6 128 32 60"
)
mkdir -p "$OUT"
for spec in "${SHAPES[@]}"; do
  read -r name layers hidden heads seq mbs iters <<<"$spec"
  run="$OUT/$name"
  if [[ ! -f "$run/eval/report.json" ]]; then
    start=$(date +%s)
    "$PYTHON" -m megatron_yuyuan.finetune --config small --num-layers "$layers" --hidden-size "$hidden" \
      --num-attention-heads "$heads" --data-prefix "$PREFIX" --seq-length "$seq" \
      --micro-batch-size "$mbs" --global-batch-size "$mbs" --train-iters "$iters" \
      --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters $(( iters / 20 + 1 )) --lr-decay-style cosine \
      --weight-decay 0.01 --clip-grad 1.0 --log-interval 10 --save "$run/ckpt" \
      --save-interval "$iters" --metrics-file "$run/metrics.jsonl" 2>&1 | grep -v "^train:" | tail -3
    echo "$(( $(date +%s) - start ))" > "$run/train_seconds"
    "$PYTHON" -m megatron_yuyuan.eval_qa --load "$run/ckpt" --references "${PREFIX}_valid.jsonl" \
      --limit 100 --out "$run/eval" --name "$name" --max-new-tokens 96 --no-repeat-ngram-size 4 \
      --batch-size 16 > "$run/eval.log" 2>&1 || { tail -3 "$run/eval.log"; exit 1; }
  fi
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys, pathlib
print("| shape | train s | tokens/s | final loss | ROUGE-L | BLEU-1 (smoothed) | BLEU-4 (smoothed) |")
print("|---|---|---|---|---|---|---|")
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    if not (run / "eval/report.json").is_file():
        continue
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    e = json.loads((run / "eval/report.json").read_text())["systems"][run.name]
    s = e["smoothed"]["sentence"]["cumulative"]
    tps = sum(r["tokens_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1)
    print(f"| {run.name} | {(run / 'train_seconds').read_text().strip()} | {tps:.0f} | "
          f"{rows[-1]['loss']:.3f} | {e['metrics']['rougeL']:.4f} | {s['1']:.4f} | {s['4']:.4f} |")
PY
