"""``evaluate`` at scale: time and peak memory for N questions, against the libraries called
directly, measured in the same run.

* baseline: each metric from its reference library, pair by pair, as a straightforward script does
  (and as ``evaluate`` did before): nltk ``sentence_bleu`` per BLEU variant (4 cumulative + 4
  individual, smoothed and unsmoothed) and ``corpus_bleu`` per variant, rouge_score's
  ``RougeScorer``, sacreBLEU's ``corpus_chrf`` and ``corpus_bleu``; timed on ``--baseline-pairs``
  (it is too slow for all of them), reported as pairs/s.
* ours: ``python -m megatron_yuyuan.evaluate`` on all ``--pairs`` (1,000-resample bootstrap,
  examples, plot): wall time and the peak resident memory of the process and its workers.

Pairs: references are MedQuAD answers (``--input``: a ``*_train.jsonl`` written by
``tools.preprocess_medquad``), drawn with a fixed seed; each prediction is a generation-sized
answer (at most 190 words: the first 60 words of the reference, then another answer).

    python -m tools.preprocess_medquad --input ../shared/data/MedQuAD --output-prefix /tmp/mq
    python -m benchmarks.bench_evaluate --input /tmp/mq_train.jsonl --pairs 50000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path


def write_pairs(rows: list[dict], n: int, refs: Path, preds: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    with refs.open("w") as r, preds.open("w") as p:
        for i in range(n):
            a, b = rows[rng.randrange(len(rows))], rows[rng.randrange(len(rows))]
            r.write(json.dumps({"id": f"q{i}", "answer": a["answer"], "qtype": a.get("qtype")}))
            r.write("\n")
            words = (a["answer"].split()[:60] + b["answer"].split())[:190]
            p.write(json.dumps({"id": f"q{i}", "prediction": " ".join(words)}) + "\n")


def baseline_seconds(refs: list[str], hyps: list[str]) -> float:
    import sacrebleu
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
    from rouge_score import rouge_scorer

    from megatron_yuyuan.eval.bleu import VARIANTS, bleu_weights, tokenize

    start = time.perf_counter()
    rt, ht = [tokenize(x) for x in refs], [tokenize(x) for x in hyps]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in (SmoothingFunction().method0, SmoothingFunction().method1):
            for kind, n in VARIANTS:
                w = bleu_weights(n, kind)
                [sentence_bleu([r], h, weights=w, smoothing_function=fn) for r, h in zip(rt, ht)]
                corpus_bleu([[r] for r in rt], ht, weights=w, smoothing_function=fn)
    [scorer.score(r, h) for r, h in zip(refs, hyps)]
    sacrebleu.corpus_chrf(hyps, [refs])
    sacrebleu.corpus_bleu(hyps, [refs])
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="a MedQuAD *_train.jsonl")
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--baseline-pairs", type=int, default=500)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.input.open()]
    with tempfile.TemporaryDirectory() as tmp:
        refs, preds = Path(tmp) / "refs.jsonl", Path(tmp) / "preds.jsonl"
        write_pairs(rows, args.pairs, refs, preds)
        ref_text = [json.loads(x)["answer"] for x in refs.open()][: args.baseline_pairs]
        hyp_text = [json.loads(x)["prediction"] for x in preds.open()][: args.baseline_pairs]
        base_rate = len(ref_text) / baseline_seconds(ref_text, hyp_text)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "megatron_yuyuan.evaluate", "--references", str(refs)]
        cmd += ["--predictions", f"ours={preds}", "--out", str(Path(tmp) / "report")]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ours_s = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"evaluate on {args.pairs:,} pairs (baseline timed on {args.baseline_pairs:,})")
    print(f"{'':<36} {'pairs/s':>9} {'wall s':>8} {'peak GiB':>9} {'speed':>6}")
    print(f"{'baseline (libraries pair by pair)':<36} {base_rate:>9.1f} {'':>8} {'':>9} 1.00x")
    rate = args.pairs / ours_s
    print(
        f"{'evaluate (1,000 bootstrap resamples)':<36} {rate:>9.1f} {ours_s:>8.1f} {peak:>9.2f} "
        f"{rate / base_rate:>5.2f}x"
    )


if __name__ == "__main__":
    main()
