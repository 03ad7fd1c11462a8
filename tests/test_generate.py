"""Generation: KV-cache decoding on the megatron-core model against transformers, across TP/PP."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from checkpoints_convert.to_hf import main as to_hf
from checkpoints_convert.to_megatron import main as to_megatron
from conftest import TORCHRUN_ENV, torchrun_cmd, write_gpt2
from megatron_yuyuan.generate import main as generate_main
from megatron_yuyuan.generation import (
    HFGenerator,
    MegatronGenerator,
    SamplingConfig,
    generate_file,
)
from megatron_yuyuan.prompts import format_prompt

QUESTIONS = [
    "What is glaucoma ?",
    "How many people are affected by Holmes-Adie syndrome ?",
    "What are the treatments for high blood cholesterol in adults with diabetes ?",
    "Is it inherited ?",
    "What causes Bell's palsy ?",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny GPT-2-vocabulary model with peaked logits (so greedy tokens vary), converted to a
    megatron checkpoint padded for TP=2, and exported back to HF from that checkpoint."""
    root = tmp_path_factory.mktemp("gen")
    write_gpt2(root / "src", positions=128, peaked=True)
    assert (
        to_megatron(
            [
                "--hf-dir",
                str(root / "src"),
                "--save",
                str(root / "mc"),
                "--tensor-model-parallel-size",
                "2",
            ]
        )
        == 0
    )
    assert to_hf(["--load", str(root / "mc"), "--out", str(root / "export")]) == 0
    questions = root / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(QUESTIONS))
    )
    return root


@pytest.fixture(scope="module")
def megatron_generator(models):
    gen = MegatronGenerator.from_checkpoint(str(models / "mc"))
    yield gen
    from megatron_yuyuan.parallel import destroy_distributed

    destroy_distributed()


def prompt_ids(gen):
    return gen.tokenizer.encode_batch([format_prompt(q) for q in QUESTIONS])


def test_greedy_matches_transformers_generate_on_the_export(models, megatron_generator):
    cfg = SamplingConfig(max_new_tokens=12)
    ours = megatron_generator.generate_ids(prompt_ids(megatron_generator), cfg)
    theirs = HFGenerator(str(models / "export")).generate_ids(prompt_ids(megatron_generator), cfg)
    assert ours == theirs
    assert len({tuple(x) for x in ours}) == len(QUESTIONS), "outputs should differ per prompt"
    # batching with left padding changes nothing: each prompt alone gives the same tokens
    for ids, expected in zip(prompt_ids(megatron_generator), ours):
        assert megatron_generator.generate_ids([ids], cfg) == [expected]


def test_repetition_controls_match_transformers_generate(models, megatron_generator):
    """--repetition-penalty and --no-repeat-ngram-size: the same greedy tokens as transformers'
    logits processors, and they do change what a looping model says."""
    hf = HFGenerator(str(models / "export"))
    ids = prompt_ids(megatron_generator)
    plain = megatron_generator.generate_ids(ids, SamplingConfig(max_new_tokens=24))
    for cfg in (
        SamplingConfig(max_new_tokens=24, repetition_penalty=1.8),
        SamplingConfig(max_new_tokens=24, no_repeat_ngram_size=2),
        SamplingConfig(max_new_tokens=24, repetition_penalty=0.7, no_repeat_ngram_size=3),
    ):
        ours = megatron_generator.generate_ids(ids, cfg)
        assert ours == hf.generate_ids(ids, cfg), cfg
        assert ours != plain, cfg
    cfg = SamplingConfig(max_new_tokens=24, no_repeat_ngram_size=2)
    for row, prompt in zip(megatron_generator.generate_ids(ids, cfg), ids):
        seq = list(prompt) + row
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams)), "a bigram repeated"


def test_kv_cache_equals_no_cache(megatron_generator):
    cfg = SamplingConfig(max_new_tokens=10)
    ids = prompt_ids(megatron_generator)
    assert megatron_generator.generate_ids(
        ids, cfg, use_cache=True
    ) == megatron_generator.generate_ids(ids, cfg, use_cache=False)


def test_seeded_sampling(megatron_generator):
    ids = prompt_ids(megatron_generator)[:2]
    cfg = SamplingConfig(
        max_new_tokens=8, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3
    )
    first = megatron_generator.generate_ids(ids, cfg)
    assert megatron_generator.generate_ids(ids, cfg) == first
    greedy = megatron_generator.generate_ids(ids, SamplingConfig(max_new_tokens=8))
    assert (
        megatron_generator.generate_ids(
            ids, SamplingConfig(max_new_tokens=8, do_sample=True, top_k=1)
        )
        == greedy
    )


def test_sampling_filters_per_row():
    """top-p keeps the token that crosses p; top-k keeps k; each row by its own values."""
    from megatron_yuyuan.decoding import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    draws: list[set] = [set(), set()]
    for _ in range(300):
        got = sample(
            logits, torch.ones(2), torch.tensor([0, 3]), torch.tensor([0.7, 1.0]), gens
        ).tolist()
        for row, token in enumerate(got):
            draws[row].add(token)
    assert draws == [{0, 1}, {0, 1, 2}]  # 0.5 < 0.7 needs the second token, not the third


def run_generate(nproc, models, out, extra):
    cmd = torchrun_cmd(
        nproc,
        "megatron_yuyuan.generate",
        "--load",
        str(models / "mc"),
        "--input",
        str(models / "questions.jsonl"),
        "--output",
        str(out),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
        *extra,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=TORCHRUN_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"], []],
    ids=["tp2", "pp2", "dp2"],  # dp2: the two ranks split the questions, rank 0 re-orders them
)
def test_parallel_layouts_generate_the_same_tokens_as_tp1(
    models, tmp_path, megatron_generator, layout
):
    ref = tmp_path / "tp1.jsonl"
    generate_file(
        megatron_generator, models / "questions.jsonl", ref, SamplingConfig(max_new_tokens=12), 2
    )
    want = [json.loads(line) for line in ref.read_text().splitlines()]
    got = run_generate(2, models, tmp_path / "par.jsonl", layout)
    assert [g["id"] for g in got] == [f"q{i}" for i in range(len(QUESTIONS))]
    assert [g["generation"] for g in got] == [w["generation"] for w in want]


def test_cli_reports_bad_input(models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "no question field"}\n')
    assert (
        generate_main(
            [
                "--hf-dir",
                str(models / "export"),
                "--input",
                str(bad),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "no 'question' field" in capsys.readouterr().err
