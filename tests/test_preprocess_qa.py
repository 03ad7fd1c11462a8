"""tools.preprocess_qa: every format gives the same files, chats keep loss on assistant turns only,
bad rows are counted, bad inputs are one error line; read back with megatron-core's own reader."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import write_rows
from megatron_yuyuan.data.indexed import read_qa_documents
from megatron_yuyuan.prompts import PromptTemplate
from megatron_yuyuan.tokenizer import load_tokenizer
from tools.preprocess_qa import main as preprocess_qa

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    'fever cough asthma insulin dose rash kidney liver it\'s 5% "quoted", comma; ünïcode µg'.split()
)


def make_pairs(n: int = 200) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) + f" #{i}?"
        a = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) + f" (answer {i})."
        out.append({"question": q, "answer": a})
    return out


def write_formats(folder: Path, pairs: list[dict]) -> dict[str, Path]:
    import datasets

    paths = {}
    paths["jsonl"] = folder / "pairs.jsonl"
    write_rows(paths["jsonl"], pairs)
    paths["json"] = folder / "pairs.json"
    paths["json"].write_text(json.dumps(pairs, indent=2))
    paths["literal"] = folder / "pairs.txt"  # the upstream's cleaned lines: repr() of a dict
    paths["literal"].write_text("".join(repr(p) + "\n" for p in pairs))
    for name, delim in (("csv", ","), ("tsv", "\t")):
        paths[name] = folder / f"pairs.{name}"
        with paths[name].open("w", newline="", encoding="utf-8-sig") as f:
            w = csv.DictWriter(f, ["question", "answer"], delimiter=delim, lineterminator="\r\n")
            w.writeheader()
            w.writerows(pairs)
    ds = datasets.Dataset.from_list(pairs)
    paths["parquet"] = folder / "pairs.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["arrow"] = folder / "pairs_arrow"
    ds.save_to_disk(str(paths["arrow"]))
    return paths


def run(argv, capsys=None) -> int:
    return preprocess_qa([*map(str, argv), "--no-progress", "--workers", "1"])


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    return write_formats(folder, make_pairs())


def digests(prefix: Path) -> dict[str, bytes]:
    return {
        s: Path(f"{prefix}_{s}").read_bytes()
        for s in ("train.bin", "train.idx", "train.jsonl", "test.bin", "valid.idx")
    }


def test_every_format_gives_byte_identical_files(formats, tmp_path):
    results = {}
    for name, path in formats.items():
        assert run(["--input", path, "--output-prefix", tmp_path / name, "--valid-size", "20"]) == 0
        results[name] = digests(tmp_path / name)
    reference = results["jsonl"]
    for name, got in results.items():
        assert got == reference, f"{name} differs from jsonl"
    # megatron-core's reader agrees: 200 pairs = 160 + 20 + 20, two sequences each
    ds = IndexedDataset(str(tmp_path / "jsonl_train"))
    assert len(ds.document_indices) - 1 == 160 and len(ds) == 320
    tok = load_tokenizer("gpt2")
    first = json.loads((tmp_path / "jsonl_train.jsonl").read_text().splitlines()[0])
    prompt, answer = ds[0], ds[1]
    assert tok.decode(prompt) == f"Question:{first['question']} answer:"
    assert tok.decode(answer[:-1]) == " " + first["answer"] and answer[-1] == tok.eod


def test_two_workers_write_what_one_writes(formats, tmp_path):
    common = ["--input", formats["jsonl"], "--valid-size", "20", "--no-progress"]
    assert (
        preprocess_qa(
            [*map(str, common), "--output-prefix", str(tmp_path / "one"), "--workers", "1"]
        )
        == 0
    )
    assert (
        preprocess_qa(
            [*map(str, common), "--output-prefix", str(tmp_path / "two"), "--workers", "2"]
        )
        == 0
    )
    assert digests(tmp_path / "one") == digests(tmp_path / "two")


def test_common_shapes_are_recognised(tmp_path, capsys):
    rows = {
        "alpaca": [
            {
                "instruction": f"What is {i}?",
                "input": "in adults" if i % 2 else "",
                "output": f"It is {i}.",
            }
            for i in range(30)
        ],
        "completion": [{"prompt": f"What is {i}?", "completion": f"It is {i}."} for i in range(30)],
        "query": [{"query": f"What is {i}?", "response": f"It is {i}."} for i in range(30)],
    }
    for name, data in rows.items():
        path = tmp_path / f"{name}.jsonl"
        write_rows(path, data)
        assert run(["--input", path, "--output-prefix", tmp_path / name]) == 0
    out = capsys.readouterr().out
    assert "question <- 'instruction' + 'input', answer <- 'output'" in out
    assert "question <- 'prompt', answer <- 'completion'" in out
    recs = [json.loads(x) for x in (tmp_path / "alpaca_train.jsonl").read_text().splitlines()]
    assert any(r["question"].endswith("?\nin adults") for r in recs)


def chat_rows() -> list[dict]:
    rows = []
    for i in range(40):
        turns = [
            {"role": "user", "content": f"I have a fever {i}."},
            {"role": "assistant", "content": f"How high is it {i}?"},
        ]
        if i % 2:
            turns += [
                {"role": "user", "content": f"It is 39 degrees {i}."},
                {"role": "assistant", "content": f"Drink water and rest {i}."},
            ]
        if i % 3 == 0:
            turns.insert(0, {"role": "system", "content": "You are a nurse."})
        rows.append({"messages": turns})
    return rows


def test_chat_documents_alternate_prompt_and_answer(tmp_path):
    rows = chat_rows()
    sharegpt = [
        {
            "conversations": [
                {
                    "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                    "value": m["content"],
                }
                for m in r["messages"]
            ]
        }
        for r in rows
    ]
    for name, data in (("openai", rows), ("sharegpt", sharegpt)):
        path = tmp_path / f"{name}.jsonl"
        write_rows(path, data)
        assert (
            run(
                [
                    "--input",
                    path,
                    "--output-prefix",
                    tmp_path / name,
                    "--valid-size",
                    "0",
                    "--test-size",
                    "0",
                ]
            )
            == 0
        )
    assert digests(tmp_path / "openai") == digests(tmp_path / "sharegpt")
    tok = load_tokenizer("gpt2")
    docs = read_qa_documents(tmp_path / "openai_train")
    recs = [json.loads(x) for x in (tmp_path / "openai_train.jsonl").read_text().splitlines()]
    assert len(docs) == 40
    for doc, rec in zip(docs, recs):
        msgs = rec["messages"]
        pieces = PromptTemplate().chat_pieces(msgs)
        assert len(doc.sequences) == len(pieces) == 2 * sum(m["role"] == "assistant" for m in msgs)
        for k, (seq, text) in enumerate(zip(doc.sequences, pieces)):
            want = tok.encode(text) + ([tok.eod] if k % 2 else [])
            assert seq.tolist() == want
        if msgs[0]["role"] == "system":
            assert tok.decode(doc.sequences[0]).startswith("You are a nurse.\nQuestion:")


def test_bad_rows_are_counted_with_locations(tmp_path, capsys):
    good = [json.dumps({"question": f"q{i}?", "answer": f"a {i}."}) for i in range(20)]
    bad = [
        "{not json",
        json.dumps({"question": "no answer"}),
        json.dumps({"question": "", "answer": "empty question"}),
        json.dumps({"question": 7, "answer": "number"}),
        json.dumps([1, 2]),
        "{'question': __import__('os').system('touch PWNED'), 'answer': 'x'}",
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        ("\n".join(good[:10] + bad + good[10:]) + "\n").encode() + b"\xff\xfe bad bytes\n"
    )
    assert run(["--input", path, "--output-prefix", tmp_path / "out"]) == 0
    out = capsys.readouterr().out
    assert "dropped: missing field 'answer': 1" in out and f"{path}:12" in out
    assert "dropped: empty field 'question': 1" in out
    assert "dropped: field 'question' is not a string: 1" in out
    assert "not a JSON object or Python-literal dict: 2" in out
    assert "dropped: not UTF-8: 1" in out
    meta = json.loads((tmp_path / "out_meta.json").read_text())
    assert sum(meta["report"]["dropped"].values()) == 7
    assert sum(meta["report"]["split_pairs"].values()) == 20
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    # --strict: the first bad row is the error, nothing is written
    assert run(["--input", path, "--output-prefix", tmp_path / "strict", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and f"{path}:11" in err[0]
    assert not list(tmp_path.glob("strict*")) and not list(tmp_path.glob(".strict*"))


def test_a_literal_line_carrying_a_call_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "X"
    path = tmp_path / "evil.txt"
    path.write_text(f"{{'question': __import__('os').system('touch {marker}'), 'answer': 'a'}}\n")
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.preprocess_qa",
            "--input",
            str(path),
            "--output-prefix",
            str(tmp_path / "o"),
            "--strict",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert code.returncode == 2 and code.stderr.count("error:") == 1, code.stderr
    assert not marker.exists()
    assert not list(tmp_path.glob("o_*"))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--prompt-template", "Q: {context} A:"], ["no {question} field"]),
        (
            ["--prompt-template", "Context: {context}\nQuestion: {question} answer:"],
            ["no field 'context'", "--prompt-template"],
        ),
        (["--prompt-template", "Question: {question} answer: "], ["ends with whitespace"]),
        (["--prompt-template", "Question: {question!r} answer:"], ["not a plain field"]),
        (["--question-field", "q", "--answer-field", "a"], ["no field 'q'", "--question-field"]),
        (["--id-field", "nope"], ["no field 'nope'"]),
    ],
)
def test_bad_templates_and_fields_are_one_line(formats, tmp_path, capsys, extra, words):
    code = run(["--input", formats["csv"], "--output-prefix", tmp_path / "out", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0]
    assert not list(tmp_path.iterdir())


def test_hf_hub_name_offline_is_one_line(tmp_path):
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.preprocess_qa",
            "--input",
            "hf:someone/medical-faq@train",
            "--output-prefix",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --input hf:someone/medical-faq@train")
    assert "hub" in lines[0]
    assert not list(tmp_path.glob("o_*"))


def test_template_with_context_is_recorded(tmp_path):
    rows = [
        {"question": f"Dose {i}?", "answer": f"{i} mg.", "context": f"Leaflet {i}: take {i} mg."}
        for i in range(30)
    ]
    path = tmp_path / "ctx.jsonl"
    write_rows(path, rows)
    template = "Context: {context}\nQuestion: {question} answer:"
    assert (
        run(["--input", path, "--output-prefix", tmp_path / "ctx", "--prompt-template", template])
        == 0
    )
    meta = json.loads((tmp_path / "ctx_meta.json").read_text())
    assert PromptTemplate.from_meta(meta, "meta").text == template
    rec = json.loads((tmp_path / "ctx_train.jsonl").read_text().splitlines()[0])
    tok = load_tokenizer("gpt2")
    doc = read_qa_documents(tmp_path / "ctx_train")[0]
    assert (
        tok.decode(doc.prompt) == f"Context: {rec['context']}\nQuestion: {rec['question']} answer:"
    )


def test_user_splits_are_kept_and_repeats_removed(tmp_path, capsys):
    pairs = make_pairs(60)
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    write_rows(train, pairs)
    # the test set repeats 5 training questions (one with another answer) and adds 5 new pairs
    held = [{**pairs[i], "answer": pairs[i]["answer"] + (" x" if i == 0 else "")} for i in range(5)]
    held += [{"question": f"new {i}?", "answer": f"new answer {i}."} for i in range(5)]
    write_rows(test, held)
    assert (
        run(
            [
                "--input",
                train,
                "--test-input",
                test,
                "--output-prefix",
                tmp_path / "o",
                "--valid-size",
                "5",
            ]
        )
        == 0
    )
    assert "5 removed" in capsys.readouterr().out
    got = [json.loads(x) for x in (tmp_path / "o_test.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in got] == [
        (p["question"], p["answer"]) for p in held
    ]
    train_q = {
        json.loads(x)["question"] for x in (tmp_path / "o_train.jsonl").read_text().splitlines()
    }
    assert not train_q & {p["question"] for p in held}
    meta = json.loads((tmp_path / "o_meta.json").read_text())
    assert meta["report"]["split_pairs"] == {"train": 50, "valid": 5, "test": 10}


def test_splits_share_no_question_answer_or_group(tmp_path):
    rows = []
    for i in range(300):
        rows.append(
            {
                "question": f"q{i // 2}?",
                "answer": f"a{i % 7 if i % 8 == 5 else i}.",
                "doc": f"d{i // 4}",
            }
        )
    path = tmp_path / "g.jsonl"
    write_rows(path, rows)
    assert run(["--input", path, "--output-prefix", tmp_path / "g", "--group-field", "doc"]) == 0
    split_rows = {
        s: [json.loads(x) for x in (tmp_path / f"g_{s}.jsonl").read_text().splitlines()]
        for s in ("train", "valid", "test")
    }
    by_id = {f"1:{i + 1}": r for i, r in enumerate(rows)}
    seen = {}
    for s, recs in split_rows.items():
        for r in recs:
            for k in ("q:" + r["question"], "a:" + r["answer"], "d:" + by_id[r["id"]]["doc"]):
                assert seen.setdefault(k, s) == s
    assert split_rows["test"] and split_rows["valid"]


def test_a_split_point_that_changes_the_tokens_is_refused():
    from megatron_yuyuan.errors import UserError
    from megatron_yuyuan.prompts import check_split_point

    class MergesColonSpace:  # a tokenizer with a ": " token, as some sentencepiece models have
        def encode(self, text):
            out, i = [], 0
            while i < len(text):
                if text.startswith(": ", i):
                    out.append(-1)
                    i += 2
                else:
                    out.append(ord(text[i]))
                    i += 1
            return out

    check_split_point(PromptTemplate("Question {question} answer"), MergesColonSpace())
    with pytest.raises(UserError, match="merge with the answer"):
        check_split_point(PromptTemplate("Question:{question} answer:"), MergesColonSpace())


@pytest.mark.parametrize(
    "text",
    [
        "Question:{question} answer:",
        "Kontext: «{context}»\n\tFrage {{wörtlich}}: '{question}' \\ \"Antwort\":",
        "{{% raw %}}{{{{question}}}} {question} 答:",  # Jinja syntax as literal text
    ],
)
def test_the_chat_template_renders_what_training_saw(tmp_path, text):
    from transformers import AutoTokenizer

    from megatron_yuyuan.convert.hf_io import write_tokenizer_files

    template = PromptTemplate.parse(text)
    write_tokenizer_files(tmp_path, 50257, None)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    hf.chat_template = template.to_jinja()
    ctx = {"context": "the leaflet's {text}"} if "context" in template.fields else {}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is it 'safe'?", **ctx},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And for kids?", **ctx},
    ]
    pieces = template.chat_pieces(messages, ctx)
    want = "".join(p + ("<|endoftext|>" if k % 2 else "") for k, p in enumerate(pieces))
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == want


# --- found by probing as a careless user --------------------------------------------------------
def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_an_output_never_lands_on_an_input(formats, tmp_path, capsys):
    data = tmp_path / "a_train.jsonl"
    data.write_bytes(formats["jsonl"].read_bytes())
    assert run(["--input", data, "--output-prefix", tmp_path / "a"]) == 2
    assert (
        "over the input" in one_line(capsys) and data.read_bytes() == formats["jsonl"].read_bytes()
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.jsonl").write_bytes(data.read_bytes())
    assert run(["--input", folder, "--output-prefix", folder / "out"]) == 2
    assert "inside the input" in one_line(capsys)
    assert run(["--input", data, "--test-input", data, "--output-prefix", tmp_path / "b"]) == 2
    assert "also given as" in one_line(capsys)
    q = ["--question-field", "answer", "--answer-field", "answer"]
    assert run(["--input", data, *q, "--output-prefix", tmp_path / "c"]) == 2
    assert "copy its input" in one_line(capsys)


def test_a_failed_publish_changes_nothing(formats, tmp_path, capsys):
    prefix = tmp_path / "a"
    assert run(["--input", formats["jsonl"], "--output-prefix", prefix]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    (tmp_path / "a_valid.idx").unlink()
    (tmp_path / "a_valid.idx").mkdir()
    del before["a_valid.idx"]
    assert run(["--input", formats["jsonl"], "--output-prefix", prefix, "--seed", "5"]) == 2
    assert "a_valid.idx: is a directory" in one_line(capsys)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before

    # a rename that fails half way (here: the fifth) puts every earlier file back
    import pathlib

    from megatron_yuyuan.data import manifest

    (tmp_path / "a_valid.idx").rmdir()
    assert run(["--input", formats["jsonl"], "--output-prefix", prefix]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real, calls = pathlib.Path.replace, []

    def failing(self, target):
        calls.append(target)
        if len(calls) == 5:
            raise PermissionError(1, "Operation not permitted", str(target))
        return real(self, target)

    pathlib.Path.replace = failing
    try:
        assert run(["--input", formats["jsonl"], "--output-prefix", prefix, "--seed", "9"]) == 2
    finally:
        pathlib.Path.replace = real
    assert "nothing was changed" in one_line(capsys)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert manifest.verify_files(prefix, ["a_train.jsonl", "a_test.bin"])


def test_more_bad_inputs_are_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    assert run(["--input", deep, "--output-prefix", tmp_path / "o"]) == 2
    assert "not a JSON array" in one_line(capsys)
    lines = tmp_path / "deep.jsonl"
    lines.write_text(
        "[" * 100000
        + "]" * 100000
        + "\n"
        + "".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(20))
    )
    assert run(["--input", lines, "--output-prefix", tmp_path / "d"]) == 0
    assert "nested too deeply: 1" in capsys.readouterr().out
    dup = tmp_path / "dup.csv"
    dup.write_text("question,answer,answer\nq?,a1,b1\n")
    assert run(["--input", dup, "--output-prefix", tmp_path / "o"]) == 2
    assert "'answer' appear more than once" in one_line(capsys)
    tsv = tmp_path / "tabs.csv"
    tsv.write_text("question\tanswer\nq?\ta\n")
    assert run(["--input", tsv, "--output-prefix", tmp_path / "o"]) == 2
    assert "--format tsv" in one_line(capsys)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("question,answer\nq?,caf\xe9\n".encode("latin-1"))
    assert run(["--input", latin, "--output-prefix", tmp_path / "o"]) == 2
    assert "save it as UTF-8" in one_line(capsys)
    header_only = tmp_path / "h.csv"
    header_only.write_text("question,answer\n")
    assert run(["--input", header_only, "--output-prefix", tmp_path / "o"]) == 2
    assert "no rows were read" in one_line(capsys)
    empties = tmp_path / "e.jsonl"
    empties.write_text(json.dumps({"question": "q?", "answer": None}) + "\n")
    assert run(["--input", empties, "--output-prefix", tmp_path / "o"]) == 2
    assert f"null field 'answer': 1 (e.g. {empties}:1)" in one_line(capsys)
    assert run(["--input", "hf:someone/data@", "--output-prefix", tmp_path / "o"]) == 2
    assert "hf:NAME" in one_line(capsys)
    assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob(".o_*"))


def test_a_split_smaller_than_asked_is_said_and_chats_group_by_conversation(tmp_path, capsys):
    same = tmp_path / "same.jsonl"
    same.write_text(
        "".join(
            json.dumps({"question": "Why?", "answer": f"because {i}"}) + "\n" for i in range(30)
        )
    )
    assert (
        run(
            [
                "--input",
                same,
                "--output-prefix",
                tmp_path / "s",
                "--valid-size",
                "3",
                "--test-size",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "warning: the valid split has 0 of the 3" in out and "warning: the test split has 0" in out
    )
    chats = tmp_path / "c.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Topic {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": f"More on {i}."},
            ]
        }
        for i in range(30)
    ]
    write_rows(chats, rows)
    assert (
        run(
            [
                "--input",
                chats,
                "--output-prefix",
                tmp_path / "c",
                "--valid-size",
                "3",
                "--test-size",
                "3",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "c_meta.json").read_text())
    assert meta["report"]["split_pairs"] == {"train": 24, "valid": 3, "test": 3}
    parts = tmp_path / "parts.jsonl"
    parts.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": f"Q{i}?"}]},
                        {"role": "assistant", "content": f"A{i}."},
                    ]
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    assert run(["--input", parts, "--output-prefix", tmp_path / "p"]) == 0
    first = json.loads((tmp_path / "p_train.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"].startswith("Q")
