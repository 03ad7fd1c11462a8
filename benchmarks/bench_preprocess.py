"""Preprocessing throughput on the full MedQuAD, against a naive baseline measured in the same run.

* baseline: stdlib XML parse of every file, then the HF fast GPT-2 tokenizer called one pair at a
  time, single process; it writes nothing.
* ours: ``preprocess_medquad`` end to end (parse + clean + dedup + split + tokenize + write JSONL,
  .bin/.idx and meta), tokenizer loading included.

Also reports the share of real (non-pad) tokens when the train split is packed into 1024-token
sequences, versus padding every pair to 1024 as the upstream recipe does.

    python -m benchmarks.bench_preprocess --input ../shared/data/MedQuAD
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

from megatron_yuyuan.tokenizer import gpt2_bpe_files


def naive_baseline(root: Path) -> tuple[float, int, int]:
    """Returns (seconds, pairs, tokens)."""
    from transformers import GPT2TokenizerFast

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tok_dir:
        vocab, merges = gpt2_bpe_files()
        shutil.copy(vocab, Path(tok_dir) / "vocab.json")
        shutil.copy(merges, Path(tok_dir) / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(tok_dir)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="../shared/data/MedQuAD")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=1024)
    args = parser.parse_args(argv)
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
