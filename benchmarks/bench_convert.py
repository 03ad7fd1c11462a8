"""Conversion cost at full size: a random ``yuyuan-3.5b`` HF checkpoint (fp16) -> megatron-core
(padded for TP=2, checked for PP=2) -> HF, with wall time and peak RSS of each step.

Each conversion runs in its own process, so its peak resident memory is its own; the ratio is peak
RSS over the checkpoint's size on disk. The round trip is also checked for bitwise equality.

    python -m benchmarks.bench_convert --workdir /tmp/bench_convert   # needs ~22 GB of disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_yuyuan.config import get_preset
from megatron_yuyuan.convert.hf_io import ShardedSafetensorsWriter, hf_config_dict

_RUN = (
    "import resource, runpy, sys; sys.argv = sys.argv[1:]; mod = sys.argv[0]\n"
    "try:\n    runpy.run_module(mod, run_name='__main__')\nexcept SystemExit as e:\n"
    "    code = e.code\nelse:\n    code = 0\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
    "sys.exit(code)"
)


def write_random_hf(out: Path, preset: str) -> int:
    """An fp16 GPT2LMHeadModel directory with random weights, written shard by shard."""
    m = get_preset(preset)
    h, f, v, p = m.hidden_size, m.ffn_size, m.vocab_size, m.max_position_embeddings
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(out)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    writer.add("transformer.wte.weight", rnd(v, h))
    writer.add("transformer.wpe.weight", rnd(p, h))
    for i in range(m.num_layers):
        pre = f"transformer.h.{i}."
        for name, shape in (
            ("ln_1.weight", (h,)),
            ("ln_1.bias", (h,)),
            ("attn.c_attn.weight", (h, 3 * h)),
            ("attn.c_attn.bias", (3 * h,)),
            ("attn.c_proj.weight", (h, h)),
            ("attn.c_proj.bias", (h,)),
            ("ln_2.weight", (h,)),
            ("ln_2.bias", (h,)),
            ("mlp.c_fc.weight", (h, f)),
            ("mlp.c_fc.bias", (f,)),
            ("mlp.c_proj.weight", (f, h)),
            ("mlp.c_proj.bias", (h,)),
        ):
            writer.add(pre + name, rnd(*shape))
    writer.add("transformer.ln_f.weight", rnd(h))
    writer.add("transformer.ln_f.bias", rnd(h))
    writer.close()
    (out / "config.json").write_text(json.dumps(hf_config_dict(m, torch.float16)))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def timed(module: str, *args: str) -> tuple[float, float]:
    """Run ``python -m module args`` in a fresh process: (seconds, peak RSS in bytes)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, module, *args], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss = next(int(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("MAXRSS_KB"))
    return elapsed, rss * 1024


def same_weights(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                out.update({k: f for k in sf.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for key in ia:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--preset", default="yuyuan-3.5b")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf, mc, back = work / "hf", work / "megatron", work / "hf_back"
    start = time.perf_counter()
    size = write_random_hf(hf, args.preset)
    make_s = time.perf_counter() - start
    to_mc_s, to_mc_rss = timed(
        "checkpoints_convert.to_megatron",
        "--hf-dir",
        str(hf),
        "--save",
        str(mc),
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "2",
    )
    to_hf_s, to_hf_rss = timed("checkpoints_convert.to_hf", "--load", str(mc), "--out", str(back))
    equal = same_weights(hf, back)
    print(
        f"\n{args.preset}: random fp16 HF checkpoint {size / 1e9:.2f} GB "
        f"(written in {make_s:.0f} s)"
    )
    print("| step | wall s | peak RSS GB | peak RSS / checkpoint |")
    print("|---|---|---|---|")
    print(
        f"| HF -> megatron-core (TP=2, PP=2) | {to_mc_s:.1f} | {to_mc_rss / 1e9:.2f} | "
        f"{to_mc_rss / size:.2f}x |"
    )
    print(
        f"| megatron-core -> HF | {to_hf_s:.1f} | {to_hf_rss / 1e9:.2f} | {to_hf_rss / size:.2f}x |"
    )
    print(f"round trip bitwise identical: {equal}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
