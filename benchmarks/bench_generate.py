"""Generation throughput: our KV-cache decoding on the megatron-core model (TP=1) vs
``transformers.generate`` on the same weights, batch, prompts and thread count, in the same run.

A random model of the chosen preset is written as an HF directory, converted to a megatron-core
checkpoint, and both generate greedily from the same MedQuAD prompts. Both produce the same tokens
(checked), so tokens/s compare like for like.

    python -m benchmarks.bench_generate --preset small --batch-size 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_yuyuan import cpu_compat
from megatron_yuyuan.config import get_preset
from megatron_yuyuan.data.medquad import parse_medquad
from megatron_yuyuan.data.sample import SAMPLE_DIR
from megatron_yuyuan.prompts import format_prompt


def make_models(root: Path, preset: str, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from checkpoints_convert.to_megatron import main as to_megatron
    from megatron_yuyuan.convert.hf_io import hf_config_dict, write_tokenizer_files

    m = get_preset(preset)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(m, dtype)))
    with torch.no_grad():  # peaked logits: greedy text that does not hit EOS early
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    hf.to(dtype).save_pretrained(str(root / "hf"))
    write_tokenizer_files(root / "hf", m.vocab_size, None)
    assert to_megatron(["--hf-dir", str(root / "hf"), "--save", str(root / "mc")]) == 0
    return root / "hf", root / "mc"


def device_label(threads: int) -> str:
    """What the numbers were measured on, for the benchmark tables."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {threads} threads"


def time_it(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--skip-no-cache",
        action="store_true",
        help="do not time decoding without the KV cache (minutes at 3.5B)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights and activations of both generators (bf16 for yuyuan-3.5b on a GPU)",
    )
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if get_preset(args.preset).vocab_size != 50257:
        p.error(f"--preset {args.preset}: prompts are GPT-2 tokens; use a GPT-2-vocabulary preset")
    cpu_compat.apply_if_no_cuda()
    torch.set_num_threads(args.threads)
    from megatron_yuyuan.generation import HFGenerator, MegatronGenerator, SamplingConfig

    records, _ = parse_medquad(SAMPLE_DIR)
    questions = [r.question for r in records[: args.batch_size]]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, mc_dir = make_models(Path(tmp), args.preset, dtype)
        ours = MegatronGenerator.from_checkpoint(str(mc_dir), dtype=dtype)
        theirs = HFGenerator(str(hf_dir), dtype=dtype)
        prompts = ours.tokenizer.encode_batch([format_prompt(q) for q in questions])
        ours.generate_ids(prompts, cfg)  # warm-up
        theirs.generate_ids(prompts, cfg)
        hf_s, hf_out = time_it(lambda: theirs.generate_ids(prompts, cfg), args.repeats)
        our_s, our_out = time_it(lambda: ours.generate_ids(prompts, cfg), args.repeats)
        nocache_s = None
        if not args.skip_no_cache:
            nocache_s, _ = time_it(lambda: ours.generate_ids(prompts, cfg, use_cache=False), 1)
    new = sum(len(x) for x in our_out)
    same = our_out == hf_out
    where = device_label(args.threads)
    print(
        f"\ngreedy generation, {args.preset} preset, batch {args.batch_size}, up to "
        f"{args.max_new_tokens} new tokens, {args.dtype}, {where}; "
        f"baseline: transformers generate (KV cache) on the same weights"
    )
    print("| generator | new tokens | median s | tokens/s | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| transformers generate | {sum(len(x) for x in hf_out)} | {hf_s:.2f} | "
        f"{new / hf_s:.0f} | 1.00x |"
    )
    print(
        f"| megatron_yuyuan, KV cache | {new} | {our_s:.2f} | {new / our_s:.0f} | "
        f"{hf_s / our_s:.2f}x |"
    )
    if nocache_s is not None:
        print(
            f"| megatron_yuyuan, no cache | {new} | {nocache_s:.2f} | {new / nocache_s:.0f} | "
            f"{hf_s / nocache_s:.2f}x |"
        )
    print(f"identical tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
