"""Rows that join and leave between decoding steps (megatron_yuyuan.slots): every request's tokens
equal the same request decoded alone, in the megatron-core model and in transformers, through slot
reuse and timeline moves; log-probabilities equal the model's own and transformers' scores."""

from __future__ import annotations

import pytest
import torch

from checkpoints_convert.to_megatron import main as to_megatron
from conftest import transformers_logprobs, write_gpt2
from megatron_yuyuan.generation import HFGenerator, MegatronGenerator, SamplingConfig
from megatron_yuyuan.slots import Admission, Plan, SlotBatch

QUESTIONS = [
    "Question:What is (are) Glaucoma ? answer:",
    "Question:Is Marfan syndrome inherited ? answer:",
    "Question:hi answer:",
    "Question:What are the treatments for Asthma and other long diseases of the lungs ? answer:",
    "Question:Who is at risk for Skin Cancer ? answer:",
]
CONFIGS = [
    SamplingConfig(max_new_tokens=30),
    SamplingConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, seed=7),
    SamplingConfig(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2),
    SamplingConfig(max_new_tokens=25, do_sample=True, top_p=0.9, seed=3),
    SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=11),
]


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    root = tmp_path_factory.mktemp("slots")
    write_gpt2(root / "hf", positions=128, peaked=True)
    assert to_megatron(["--hf-dir", str(root / "hf"), "--save", str(root / "mc")]) == 0
    return {
        "megatron": MegatronGenerator.from_checkpoint(str(root / "mc")),
        "hf": HFGenerator(str(root / "hf")),
    }


def run(core: SlotBatch, prompts, schedule, logprobs=None, compact=False) -> dict:
    """Drive ``core`` as the server's scheduler does: ``schedule`` is (step, request) arrivals;
    returns each request's tokens (and log-probabilities). ``compact`` moves live rows down into
    free slots, as the scheduler does."""
    eos = core.eos
    out: dict[int, list] = {}
    live: dict[int, int] = {}
    pending, free, release = sorted(schedule), list(range(core.slots)), []
    step = 0
    with torch.inference_mode():
        while pending or live:
            admit, moves = [], []
            free.sort()
            while compact and live and free and free[0] < max(live):
                src, dst = max(live), free.pop(0)
                live[dst] = live.pop(src)
                moves.append((src, dst))
                free = sorted(free + [src])
            while pending and pending[0][0] <= step and free:
                _, i = pending.pop(0)
                slot = free.pop(0)
                live[slot], out[i] = i, []
                admit.append(Admission(slot, prompts[i], CONFIGS[i], logprobs))
            plan, release = Plan(release=release, moves=moves, admit=admit), []
            for e in core.step(plan):
                i = live[e.slot]
                if e.token != eos:
                    out[i].append((e.token, e.logprob) if logprobs is not None else e.token)
                if e.finished:
                    release.append(e.slot)
                    free.append(e.slot)
                    del live[e.slot]
            step += 1
    return out


@pytest.mark.parametrize("kind", ["megatron", "hf"])
def test_rows_joining_and_leaving_get_the_tokens_they_get_alone(generators, kind):
    gen = generators[kind]
    prompts = gen.tokenizer.encode_batch(QUESTIONS)
    alone = {i: run(gen.slot_batch(1), prompts, [(0, i)])[i] for i in range(len(QUESTIONS))}
    assert all(len(a) == CONFIGS[i].max_new_tokens for i, a in alone.items())  # no early EOS
    # greedy alone is what `generate` answers (transformers' own generate for the HF model)
    for i in (0, 2):
        assert alone[i] == gen.generate_ids([prompts[i]], CONFIGS[i])[0]
    # three rows for five requests: rows are reused; request 3's prompt is longer than the
    # cursor when it joins (the timeline moves right)
    schedule = [(0, 0), (0, 1), (1, 3), (3, 2), (6, 4)]
    core = gen.slot_batch(3)
    assert run(core, prompts, schedule) == alone
    assert core.moves >= 1
    # live rows moved down into freed slots give the same tokens
    assert (
        run(gen.slot_batch(4), prompts, [(0, 0), (0, 1), (0, 2), (2, 3), (9, 4)], None, True)
        == alone
    )
    # a timeline barely longer than the positions: it moves left while rows are live
    core = SlotBatch(gen.slot_batch(3).stepper, 3, 128, gen.tokenizer.eod, capacity=48)
    assert run(core, prompts, [(0, 0), (10, 1), (20, 2), (28, 3), (40, 4)]) == alone
    assert core.moves >= 1


def test_logprobs_are_the_models_own_and_transformers_scores(generators):
    hf, mc = generators["hf"], generators["megatron"]
    prompt = hf.tokenizer.encode(QUESTIONS[0])
    got = run(mc.slot_batch(2), [prompt], [(0, 0)], logprobs=3)[0][:10]
    new, references = transformers_logprobs(hf.model, prompt, 10, hf.tokenizer.eod)
    assert new == [t for t, _ in got]
    for step, (token, (lp, top)) in enumerate(got):
        for reference in references:
            assert abs(lp - reference[step, token].item()) < 1e-5
            best = reference[step].topk(3)
            assert [t for t, _ in top] == best.indices.tolist()
            assert max(abs(v - w) for (_, v), w in zip(top, best.values.tolist())) < 1e-5
        assert top[0][0] == token  # greedy: the chosen token is the most likely one
