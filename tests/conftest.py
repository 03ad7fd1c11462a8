"""Shared fixtures: CPU compatibility applied, helpers that run the trainer in-process or under
torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_yuyuan import cpu_compat

cpu_compat.apply_if_no_cuda()

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path: Path, rows) -> Path:
    """A JSONL file of ``rows`` (one JSON object per line)."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
if torch.cuda.device_count() < 4:
    # The multi-process tests launch up to 4 ranks: with fewer GPUs than that (a one-GPU box),
    # they run on CPU processes with gloo, which is what they check, instead of failing on NCCL.
    TORCHRUN_ENV["CUDA_VISIBLE_DEVICES"] = ""


def torchrun_cmd(nproc: int, module: str, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` of ``module`` on a free port (gloo on CPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        module,
        *map(str, args),
    ]


def run_torchrun(nproc: int, args: list[str], tmp_path: Path, timeout: int = 300) -> list[dict]:
    """Launch ``megatron_yuyuan.finetune`` under torchrun (gloo, 1 thread per process).

    Returns the per-iteration metrics the run wrote; fails with the run's output on error.
    """
    metrics = tmp_path / f"metrics_{len(list(tmp_path.glob('metrics_*')))}.jsonl"
    cmd = torchrun_cmd(nproc, "megatron_yuyuan.finetune", *args, "--metrics-file", metrics)
    env = TORCHRUN_ENV
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return read_metrics(metrics)


def write_gpt2(
    path: Path,
    vocab: int = 50257,
    positions: int = 64,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    peaked: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random ``transformers`` GPT-2 (seed 0) saved to ``path``, with GPT-2's tokenizer files when
    the vocabulary is GPT-2's. ``peaked`` draws the matrices with std 0.3, so greedy answers vary
    per prompt instead of repeating one token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_yuyuan.convert.hf_io import write_tokenizer_files

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads
        )
    )
    if peaked:
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3)
    hf.to(dtype).save_pretrained(str(path))
    if vocab == 50257:
        write_tokenizer_files(Path(path), vocab, None)
    return Path(path)


def transformers_logprobs(model, prompt: list[int], tokens: int, pad: int):
    """Greedy ``transformers.generate`` from ``prompt``: its new ids, and two independent
    references for their log-probabilities ``[tokens, V]``: ``log_softmax`` of the model's own
    forward over the whole sequence, and of ``generate``'s scores."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
        logits = model(out.sequences).logits[0, len(prompt) - 1 : -1]
    new = out.sequences[0, len(prompt) :].tolist()
    scores = torch.cat(out.scores)  # [tokens, V]: greedy with no processors: the raw logits
    return new, [torch.log_softmax(logits.float(), -1), torch.log_softmax(scores.float(), -1)]


@pytest.fixture
def single_process_group():
    """A world of one gloo process with TP=PP=1, torn down afterwards."""
    from megatron_yuyuan import parallel

    layout = parallel.init_distributed(1, 1)
    yield layout
    parallel.destroy_distributed()


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """The embedded MedQuAD sample, preprocessed once (GPT-2 BPE): returns the output prefix."""
    from megatron_yuyuan.data.preprocess import preprocess_medquad
    from megatron_yuyuan.data.sample import SAMPLE_DIR

    prefix = str(tmp_path_factory.mktemp("medquad") / "mq")
    preprocess_medquad(SAMPLE_DIR, prefix, valid_size=10, test_size=10, seed=1, progress=False)
    return prefix
