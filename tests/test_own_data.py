"""The user's own data through the whole path: chats train on assistant tokens only (TP/PP = TP=1),
a template's prompt is the same in the training documents, generate, the server and the HF
export's chat template, and blends draw by weight and resume exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import read_metrics, run_torchrun, write_rows
from megatron_yuyuan.data.blend import BlendedQA
from megatron_yuyuan.data.indexed import read_qa_documents
from megatron_yuyuan.data.sft_dataset import QADataset
from megatron_yuyuan.finetune import main as finetune
from megatron_yuyuan.prompts import PromptTemplate
from megatron_yuyuan.tokenizer import load_tokenizer
from tools.preprocess_qa import main as preprocess_qa

# real multi-process runs (torchrun, servers): the slow tier (`-m "not slow"` skips it)
pytestmark = pytest.mark.slow

TEMPLATE = "Context: {context}\nQuestion: {question} answer:"
TINY = ["--config", "tiny", "--vocab-size", "50257", "--seq-length", "64", "--seed", "3"]
TINY += ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3"]
TINY += ["--lr-warmup-iters", "1"]


def prep(tmp: Path, name: str, rows, *extra) -> str:
    src = write_rows(tmp / f"{name}.jsonl", rows)
    prefix = tmp / name
    argv = ["--input", str(src), "--output-prefix", str(prefix), "--no-progress", "--workers", "1"]
    assert preprocess_qa([*argv, *map(str, extra)]) == 0
    return str(prefix)


def chats(n: int = 40):
    rows = []
    for i in range(n):
        turns = [
            {"role": "user", "content": f"My child has a fever of {38 + i % 3} degrees {i}."},
            {"role": "assistant", "content": f"Give fluids and check again in {i % 5 + 1} hours."},
        ]
        if i % 2:
            turns += [
                {"role": "user", "content": f"And if it rises above 40? ({i})"},
                {"role": "assistant", "content": "Call the nurse line or see a doctor today."},
            ]
        if i % 4 == 3:  # a third exchange
            turns += [
                {"role": "user", "content": f"Which fluids? ({i})"},
                {"role": "assistant", "content": "Water, or an oral rehydration solution."},
            ]
        rows.append({"messages": turns})
    return rows


@pytest.fixture(scope="module")
def chat_prefix(tmp_path_factory):
    return prep(
        tmp_path_factory.mktemp("chat"), "chat", chats(), "--valid-size", "4", "--test-size", "4"
    )


def test_chat_loss_mask_is_exactly_the_assistant_tokens(chat_prefix):
    tok = load_tokenizer("gpt2")
    ds = QADataset(f"{chat_prefix}_train", seq_length=256, packing=False)
    recs = [json.loads(x) for x in Path(f"{chat_prefix}_train.jsonl").read_text().splitlines()]
    three_turn = 0
    for i, rec in enumerate(recs):
        expected_tokens, expected_mask = [], []
        for m in rec["messages"]:
            if m["role"] == "user":
                ids = tok.encode(f"Question:{m['content']} answer:")
                flags = [0] * len(ids)
            else:
                ids = tok.encode(" " + m["content"]) + [tok.eod]
                flags = [1] * len(ids)
            expected_tokens += ids
            expected_mask += flags
        sample = ds.build_sample([i], len(expected_tokens) - 1)
        assert sample["tokens"].tolist() == expected_tokens[:-1]
        assert sample["labels"].tolist() == expected_tokens[1:]
        # label t trains exactly when token t + 1 belongs to an assistant answer (EOS included)
        assert sample["loss_mask"].tolist() == [float(f) for f in expected_mask[1:]]
        three_turn += len(rec["messages"]) == 6
    assert three_turn >= 5


CHAT_RUN = [*TINY, "--train-iters", "3", "--global-batch-size", "8"]


@pytest.fixture(scope="module")
def chat_reference(chat_prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_ref") / "m.jsonl"
    assert finetune([*CHAT_RUN, "--data-prefix", chat_prefix, "--metrics-file", str(path)]) == 0
    return read_metrics(path)


@pytest.mark.parametrize(
    "layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]]
)
def test_chat_runs_at_tp2_and_pp2_reproduce_tp1(chat_prefix, chat_reference, tmp_path, layout):
    got = run_torchrun(2, [*CHAT_RUN, "--data-prefix", chat_prefix, *layout], tmp_path)
    assert [m["iteration"] for m in got] == [1, 2, 3]
    for g, r in zip(got, chat_reference):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)


def context_rows(n: int = 30):
    return [
        {
            "question": f"How much drug {i} may an adult take?",
            "answer": f"At most {i + 1} tablets a day.",
            "context": f"Leaflet {i}: adults take one tablet up to {i + 1} times daily.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctx")
    prefix = prep(
        tmp,
        "ctx",
        context_rows(),
        "--prompt-template",
        TEMPLATE,
        "--valid-size",
        "3",
        "--test-size",
        "3",
    )
    save = tmp / "ckpt"
    argv = [
        *TINY,
        "--train-iters",
        "2",
        "--data-prefix",
        prefix,
        "--save",
        str(save),
        "--load",
        str(save),
    ]
    assert finetune(argv) == 0
    return tmp, prefix, save


def test_a_template_gives_one_prompt_everywhere(context_run, tmp_path):
    from transformers import AutoTokenizer

    from checkpoints_convert.to_hf import main as to_hf
    from megatron_yuyuan.checkpoint import storage
    from megatron_yuyuan.generation import prompt_ids
    from megatron_yuyuan.serve.app import ServedModel, create_app
    from megatron_yuyuan.serve.scheduler import Scheduler

    tmp, prefix, save = context_run
    tok = load_tokenizer("gpt2")
    info = storage.read_info(storage.resolve(save))
    assert info.prompt_template == TEMPLATE
    template = PromptTemplate(info.prompt_template)
    rows = [json.loads(x) for x in Path(f"{prefix}_test.jsonl").read_text().splitlines()]
    docs = read_qa_documents(f"{prefix}_test")
    want = [d.prompt.tolist() for d in docs]
    # generate builds its prompts this way from the checkpoint's template
    assert [prompt_ids(tok, template, r) for r in rows] == want
    # the HF export's chat template renders the same prompt
    out = tmp_path / "hf"
    assert to_hf(["--load", str(save), "--out", str(out)]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for r, ids in zip(rows, want):
        msgs = [{"role": "user", "content": r["question"], "context": r["context"]}]
        got = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert hf_tok(got, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.apply_chat_template(msgs[:1], tokenize=False, context=r["context"]) == got
    # the server's /api/answer and /v1/chat/completions hand the engine the same ids
    from fastapi.testclient import TestClient

    from slow_server import StepEngine

    recorder = StepEngine(0, token=tok.eod, max_positions=64)  # records prompts; answers EOS
    seen = recorder.prompts
    app = create_app(Scheduler(recorder), tok, ServedModel("m", "x", template=template))
    r = rows[0]
    with TestClient(app) as client:
        a = client.post(
            "/api/answer",
            json={
                "question": r["question"],
                "fields": {"context": r["context"]},
                "max_new_tokens": 4,
            },
        )
        assert a.status_code == 200, a.text
        msgs = [{"role": "user", "content": r["question"], "context": r["context"]}]
        c = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4})
        assert c.status_code == 200, c.text
        assert c.json()["object"] == "chat.completion"
        assert c.json()["choices"][0]["message"]["role"] == "assistant"
        with client.stream(
            "POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "stream": True}
        ) as s:
            events = [x for x in s.iter_lines() if x.startswith("data: ")]
        assert (
            json.loads(events[0][6:])["object"] == "chat.completion.chunk"
            and events[-1] == "data: [DONE]"
        )
        bad = client.post("/api/answer", json={"question": r["question"], "max_new_tokens": 4})
        assert bad.status_code == 400 and "context" in bad.text
    assert seen == [want[0], want[0], want[0]]


def test_generate_uses_the_checkpoint_template_and_warns_on_override(context_run, tmp_path, capsys):
    from megatron_yuyuan.generate import main as generate

    tmp, prefix, save = context_run
    out = tmp_path / "p.jsonl"
    argv = [
        "--load",
        str(save),
        "--input",
        f"{prefix}_test.jsonl",
        "--output",
        str(out),
        "--max-new-tokens",
        "4",
    ]
    assert generate(argv) == 0
    assert "warning" not in capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    out2 = tmp_path / "p2.jsonl"
    argv2 = [
        *argv[:-4],
        "--output",
        str(out2),
        "--max-new-tokens",
        "4",
        "--prompt-template",
        "Q:{question} A:",
    ]
    assert generate(argv2) == 0
    assert "warning: --prompt-template 'Q:{question} A:' replaces" in capsys.readouterr().err


# --- blends ----------------------------------------------------------------------------------
def qa_rows(tag: str, n: int):
    return [
        {"question": f"{tag} question {i}?", "answer": f"{tag} answer number {i}."}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    return tmp, prep(tmp, "a", qa_rows("alpha", 60)), prep(tmp, "b", qa_rows("beta", 30))


def test_a_blend_draws_each_source_by_weight(two_sets):
    _, a, b = two_sets
    sets = [QADataset(f"{p}_train", 64, packing=False) for p in (a, b)]
    blend = BlendedQA(sets, [0.8, 0.2])
    counts = blend.consumed_per_source(1000)
    assert abs(counts[0] / 1000 - 0.8) <= 0.02 and abs(counts[1] / 1000 - 0.2) <= 0.02
    # a sample is a pure function of its index: a fresh reader agrees anywhere in the sequence
    again = BlendedQA([QADataset(f"{p}_train", 64, packing=False) for p in (a, b)], [0.8, 0.2])
    for i in (999, 3, 500):
        x, y = blend.micro_batch([i]), again.micro_batch([i])
        assert all(np.array_equal(x[k], y[k]) for k in x)


BLEND_RUN = [
    *TINY,
    "--train-iters",
    "4",
    "--save-interval",
    "2",
    "--eval-interval",
    "2",
    "--eval-iters",
    "1",
]


def test_a_blend_resumes_the_identical_sequence(two_sets, tmp_path, capsys):
    tmp, a, b = two_sets
    blend = ["--data-prefix", "0.8", a, "0.2", b]
    run = tmp_path / "run"
    full = tmp_path / "full.jsonl"
    assert (
        finetune(
            [
                *BLEND_RUN,
                *blend,
                "--save",
                str(run),
                "--load",
                str(run),
                "--metrics-file",
                str(full),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "samples per source:" in out
    rows = read_metrics(full)
    valid = [r for r in rows if "valid_loss" in r]
    assert valid and all(f"valid_loss[{a}]" in r and f"valid_loss[{b}]" in r for r in valid)
    losses = {r["iteration"]: r["loss"] for r in rows if "loss" in r}
    # as after a kill -9 right after the iteration-2 save: iteration 4 never happened
    for resume_layout, nproc in (([], 1), (["--tensor-model-parallel-size", "2"], 2)):
        copy = tmp_path / f"resume{nproc}"
        shutil.copytree(run, copy)
        shutil.rmtree(copy / "iter_0000004")
        (copy / "latest_checkpointed_iteration.txt").write_text("2")
        args = [*BLEND_RUN, *blend, "--save", str(copy), "--load", str(copy), *resume_layout]
        if nproc == 1:
            metrics = tmp_path / "resumed.jsonl"
            assert finetune([*args, "--metrics-file", str(metrics)]) == 0
            got = read_metrics(metrics)
        else:
            got = run_torchrun(2, args, tmp_path)
        got = {r["iteration"]: r["loss"] for r in got if "loss" in r}
        assert sorted(got) == [3, 4]
        for it in (3, 4):
            assert got[it] == pytest.approx(losses[it], rel=1e-5)


def test_blends_with_other_tokenizers_or_templates_and_bad_weights_are_refused(
    two_sets, tmp_path, capsys
):
    tmp, a, b = two_sets
    other = prep(tmp_path, "c", qa_rows("gamma", 30), "--prompt-template", "Q: {question} A:")
    cases = [
        (["0.5", a, "0.5", other], "prompt template"),
        (["0.5", a, "-1", b], "positive finite"),
        (["0.5", a, "nan", b], "positive finite"),
        (["0.5", a, "inf", b], "positive finite"),
        (["0.5", a, b], "WEIGHT PREFIX pairs"),
        ([a, "0.5", b, "0.5"], "weights go before their prefixes"),
        (
            ["0.5", a, "0.5", str(Path(a).parent / ".." / Path(a).parent.name / Path(a).name)],
            "appears twice",
        ),
        (["1", a, "1", str(tmp_path / "nope")], "tools.preprocess_qa"),
    ]
    meta = json.loads(Path(f"{b}_meta.json").read_text())
    tok_prefix = tmp_path / "tok"
    for name in (
        "train.bin",
        "train.idx",
        "train.jsonl",
        "valid.bin",
        "valid.idx",
        "valid.jsonl",
        "test.bin",
        "test.idx",
        "test.jsonl",
    ):
        shutil.copy(f"{b}_{name}", f"{tok_prefix}_{name}")
    files = {k.replace(Path(b).name, "tok", 1): v for k, v in meta["files"].items()}
    Path(f"{tok_prefix}_meta.json").write_text(
        json.dumps({**meta, "files": files, "tokenizer": "some/other-bpe"})
    )
    cases.append((["0.5", a, "0.5", str(tok_prefix)], "tokenizer"))
    for blend, words in cases:
        code = finetune([*TINY, "--train-iters", "2", "--data-prefix", *blend])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (blend, err)
        assert words in err[0], err[0]


def test_a_blend_killed_mid_run_resumes_the_identical_sequence(two_sets, tmp_path):
    """A real kill -9 some time after the iteration-2 save: the resumed run's losses are the
    uninterrupted run's (constant LR, so the schedule does not depend on where it stopped)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import TORCHRUN_ENV

    _, a, b = two_sets
    args = [*TINY, "--train-iters", "8", "--save-interval", "2", "--lr-decay-style", "constant"]
    args += ["--data-prefix", "0.8", a, "0.2", b]
    ref = tmp_path / "ref.jsonl"
    assert finetune([*args, "--metrics-file", str(ref)]) == 0
    want = {r["iteration"]: r["loss"] for r in read_metrics(ref)}
    run, metrics = tmp_path / "run", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "megatron_yuyuan.finetune", *args, "--save", str(run)]
    cmd += ["--load", str(run), "--metrics-file", str(metrics)]
    proc = subprocess.Popen(
        cmd, env=TORCHRUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (run / "iter_0000002").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "latest_checkpointed_iteration.txt").is_file()
    assert (
        finetune([*args, "--save", str(run), "--load", str(run), "--metrics-file", str(metrics)])
        == 0
    )
    got = {r["iteration"]: r["loss"] for r in read_metrics(metrics)}
    assert sorted(got) == list(range(1, 9))
    for it in range(1, 9):
        assert got[it] == pytest.approx(want[it], rel=1e-5), it


def test_eval_qa_and_the_plain_script_work_with_a_template(context_run, tmp_path):
    import subprocess
    import sys

    from megatron_yuyuan.eval_qa import main as eval_qa

    tmp, prefix, save = context_run
    out = tmp_path / "eval"
    argv = ["--load", str(save), "--references", f"{prefix}_test.jsonl", "--out", str(out)]
    assert eval_qa([*argv, "--name", "ctx", "--max-new-tokens", "4"]) == 0
    assert (out / "report.md").is_file()
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_qa.py", "--help"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--prompt-template" in proc.stdout


def test_a_blend_prefix_may_hold_spaces(two_sets, tmp_path):
    import shutil

    _, a, b = two_sets
    spaced = tmp_path / "with space"
    spaced.mkdir()
    for f in Path(b).parent.glob(Path(b).name + "_*"):
        shutil.copy(f, spaced / f.name)
    prefix = str(spaced / Path(b).name)
    metrics = tmp_path / "m.jsonl"
    argv = [*TINY, "--train-iters", "2", "--data-prefix", "0.5", a, "0.5", prefix]
    assert finetune([*argv, "--metrics-file", str(metrics)]) == 0
    assert len(read_metrics(metrics)) == 2
