"""Preprocessing throughput on the full MedQuAD, against a naive baseline measured in the same run.

* baseline: stdlib XML parse of every file, then the HF fast GPT-2 tokenizer called one pair at a
  time, single process; it writes nothing.
* ours: ``preprocess_medquad`` end to end (parse + clean + dedup + split + tokenize + write JSONL,
  .bin/.idx and meta), tokenizer loading included.

Also reports the share of real (non-pad) tokens when the train split is packed into 1024-token
sequences, versus padding every pair to 1024 as the upstream recipe does.

    python -m benchmarks.bench_preprocess --input ../shared/data/MedQuAD
    python -m benchmarks.bench_preprocess --jsonl-pairs 1000000   # tools.preprocess_qa at scale

``--jsonl-pairs N`` writes a synthetic JSONL of N pairs (~250 GPT-2 tokens each, words drawn from
a 30,000-word pseudo-vocabulary) and compares ``preprocess_qa`` with a naive single-process
baseline measured in the same run: ``json.loads`` + the fast tokenizer's ``encode`` per row +
megatron-core's ``IndexedDatasetBuilder``. Peak RSS is the largest of the process and its
workers.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from megatron_yuyuan.tokenizer import gpt2_bpe_files


def fast_gpt2():
    """Hugging Face's fast GPT-2 tokenizer over the same BPE files (the baselines' tokenizer)."""
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab, merges = gpt2_bpe_files()
        shutil.copy(vocab, Path(tok_dir) / "vocab.json")
        shutil.copy(merges, Path(tok_dir) / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(tok_dir)


def naive_baseline(root: Path) -> tuple[float, int, int]:
    """Returns (seconds, pairs, tokens)."""
    start = time.perf_counter()
    tok = fast_gpt2()
    pairs = tokens = 0
    for path in sorted(root.rglob("*.xml")):
        xml_root = ET.parse(path).getroot()
        for q_el, a_el in zip(xml_root.iter("Question"), xml_root.iter("Answer")):
            question, answer = (q_el.text or "").strip(), (a_el.text or "").strip()
            if not answer:
                continue
            ids = tok(f"Question:{question} answer: {answer}")["input_ids"] + [tok.eos_token_id]
            pairs += 1
            tokens += len(ids)
    return time.perf_counter() - start, pairs, tokens


def padding_efficiency(prefix: str, seq_length: int) -> tuple[float, float]:
    """Real-token share of the train split: packed vs padded to ``seq_length`` (truncated there)."""
    from megatron_yuyuan.data.sft_dataset import QADataset

    ds = QADataset(f"{prefix}_train", seq_length, packing=True, seed=0)
    real = sum(len(p.tokens) - 1 for p in ds.pairs)
    packed = real / (ds.samples_per_epoch() * seq_length)
    padded = real / (len(ds.pairs) * seq_length)
    return packed, padded


def synthetic_jsonl(path: Path, pairs: int, seed: int = 0) -> int:
    """Write ``pairs`` QA lines; returns the file's bytes."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(3, 11)))) for _ in range(30000)]
    words = np.array(words)
    with path.open("w") as f:
        for start in range(0, pairs, 10000):
            n = min(10000, pairs - start)
            qs = rng.integers(0, len(words), size=(n, 8))
            ans = rng.integers(0, len(words), size=(n, 50))
            for i in range(n):
                q = " ".join(words[qs[i]]) + "?"
                a = " ".join(words[ans[i]]) + "."
                f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return path.stat().st_size


def naive_jsonl_baseline(path: Path, out_prefix: str) -> tuple[float, int, int]:
    """json.loads + tokenizer.encode per row + IndexedDatasetBuilder, one process."""
    import json

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    tok = fast_gpt2()
    builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=np.uint16)
    pairs = tokens = 0
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            p = tok.encode(f"Question:{row['question']} answer:")
            a = tok.encode(" " + row["answer"]) + [tok.eos_token_id]
            builder.add_document(np.array(p + a), [len(p), len(a)])
            pairs += 1
            tokens += len(p) + len(a)
    builder.finalize(out_prefix + ".idx")
    return time.perf_counter() - start, pairs, tokens


def peak_rss_gib() -> float:
    """Largest resident set of this process and of its waited-for children (GiB)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 2**20


def bench_jsonl(pairs: int, workers: int, folder: str | None) -> int:
    from megatron_yuyuan.data.qa_preprocess import QAOptions, preprocess_qa

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "pairs.jsonl"
        size = synthetic_jsonl(src, pairs)
        print(f"synthetic input: {pairs:,} pairs, {size / 2**30:.2f} GiB", flush=True)
        rss0 = peak_rss_gib()
        start = time.perf_counter()
        report = preprocess_qa(
            QAOptions(
                inputs=[str(src)], output_prefix=f"{tmp}/ours", workers=workers, progress=False
            )
        )
        ours_s = time.perf_counter() - start
        ours_rss = peak_rss_gib()
        ours_tokens = sum(report.split_tokens.values())
        for p in Path(tmp).glob("ours_*"):
            p.unlink()
        base_s, base_pairs, base_tokens = naive_jsonl_baseline(src, f"{tmp}/naive")
    print("| pipeline | pairs | tokens | wall s | pairs/s | tokens/s | peak RSS GiB | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| naive: json.loads + encode per row + IndexedDatasetBuilder, 1 process | "
        f"{base_pairs:,} | {base_tokens:,} | {base_s:.1f} | {base_pairs / base_s:,.0f} | "
        f"{base_tokens / base_s:,.0f} | - | 1.00x |"
    )
    print(
        f"| tools.preprocess_qa (workers={workers}; splits, dedup, JSONL + .bin/.idx + meta) | "
        f"{sum(report.split_pairs.values()):,} | {ours_tokens:,} | {ours_s:.1f} | "
        f"{sum(report.split_pairs.values()) / ours_s:,.0f} | {ours_tokens / ours_s:,.0f} | "
        f"{max(ours_rss, rss0):.2f} | {base_s / ours_s:.2f}x |"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="../shared/data/MedQuAD")
    parser.add_argument(
        "--jsonl-pairs", type=int, default=0, help="benchmark preprocess_qa instead"
    )
    parser.add_argument("--tmp", default=None, help="where the synthetic input goes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.jsonl_pairs:
        return bench_jsonl(args.jsonl_pairs, args.workers, args.tmp)
    root = Path(args.input)
    if not root.is_dir():
        parser.error(f"--input {root}: no such directory")

    # Imported here: spawned workers re-import this module and must stay light (no torch).
    from megatron_yuyuan.data.preprocess import preprocess_medquad

    base_s, base_pairs, base_tokens = naive_baseline(root)
    with tempfile.TemporaryDirectory() as out:
        prefix = str(Path(out) / "medquad")
        start = time.perf_counter()
        report = preprocess_medquad(root, prefix, workers=args.workers, progress=False)
        ours_s = time.perf_counter() - start
        ours_tokens = sum(report.split_tokens.values())
        packed, padded = padding_efficiency(prefix, args.seq_length)

    print(
        f"\nMedQuAD preprocessing, {root} ({report.files:,} files), GPT-2 BPE; "
        f"baseline: stdlib XML + HF GPT2TokenizerFast per pair, 1 process, no output"
    )
    print("| pipeline | pairs | tokens | wall s | tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print(
        f"| naive baseline | {base_pairs:,} | {base_tokens:,} | {base_s:.2f} | "
        f"{base_tokens / base_s:,.0f} | 1.00x |"
    )
    print(
        f"| megatron_yuyuan (workers={args.workers}, end to end) | "
        f"{sum(report.split_pairs.values()):,} | {ours_tokens:,} | {ours_s:.2f} | "
        f"{ours_tokens / ours_s:,.0f} | {base_s / ours_s:.2f}x |"
    )
    print(
        f"\nreal tokens per {args.seq_length}-token sequence (train split): packed "
        f"{100 * packed:.1f}% vs padded to {args.seq_length} {100 * padded:.1f}% "
        f"({packed / padded:.1f}x less compute per real token)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
