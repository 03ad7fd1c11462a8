"""MedQuAD XML -> JSONL + .bin/.idx, checked with megatron-core's own IndexedDataset reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_yuyuan.data.medquad import (
    MedQuADError,
    drop_exact_duplicates,
    normalize_answer,
    normalize_question,
    parse_file,
    parse_medquad,
)
from megatron_yuyuan.data.preprocess import SPLITS, preprocess_medquad
from megatron_yuyuan.data.sample import SAMPLE_DIR
from megatron_yuyuan.prompts import format_example, format_prompt
from megatron_yuyuan.tokenizer import GPT2_EOS, load_tokenizer
from tools.preprocess_medquad import main as preprocess_main

FULL_MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "MedQuAD"


# SHA-256 (first 16 hex digits) of what tools.preprocess_medquad wrote before tools.preprocess_qa
# and chat documents were added (default flags): its output must stay byte-identical.
SAMPLE_DIGESTS = {
    "train.jsonl": "0170287cc211a96a",
    "train.bin": "7be571b4c12162b5",
    "train.idx": "d5929a651d4110b1",
    "valid.jsonl": "66989f92e7d47ac2",
    "valid.bin": "8aa3cd350510448c",
    "valid.idx": "ff9bfd783c25f2c5",
    "test.jsonl": "1ecbcc3eecd16fa3",
    "test.bin": "6c35e625d9ba772c",
    "test.idx": "0055063b41fa0166",
}
FULL_DIGESTS = {
    "train.jsonl": "dbbc4d3f4c100f01",
    "train.bin": "2ea2d75af0e6d165",
    "train.idx": "070c6fdb9a0f420b",
    "valid.jsonl": "9808098d3b903795",
    "valid.bin": "e88490cd32000b7d",
    "valid.idx": "1135f7c04556c487",
    "test.jsonl": "47026b32fab74cb5",
    "test.bin": "805a2574ac6540d1",
    "test.idx": "4c1f685391ac7044",
}


def assert_digests(prefix: str, want: dict) -> None:
    import hashlib

    got = {k: hashlib.sha256(Path(f"{prefix}_{k}").read_bytes()).hexdigest()[:16] for k in want}
    assert got == want


def test_the_sample_preprocesses_to_the_same_bytes_as_before(tmp_path):
    assert preprocess_main(["--output-prefix", str(tmp_path / "mq"), "--no-progress"]) == 0
    assert_digests(str(tmp_path / "mq"), SAMPLE_DIGESTS)


def test_gpt2_tokenizer_is_the_real_vocabulary():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Question") == [24361]
    assert (tok.vocab_size, tok.eod) == (50257, 50256)


def test_all_three_layouts_parse():
    doc = parse_file(SAMPLE_DIR / "6_NINDS_QA" / "0000007.xml")[0]
    disease = parse_file(SAMPLE_DIR / "9_CDC_QA" / "0000397.xml")[0]
    assert doc and doc[0].source == "NINDS" and doc[0].focus == "Holmes-Adie"
    assert doc[0].question == "what is holmes-adie syndrome ?"
    assert len(disease) == 5 and disease[0].focus == "Parasites - Taeniasis"
    records, stats = parse_medquad(SAMPLE_DIR)
    assert stats.empty_answers["2_GARD_QA"] == 1  # 0002079-1 has no answer
    assert sum(stats.empty_answers.values()) == sum(stats.pairs.values()) - len(records)
    assert len({r.id for r in records}) == len(records)
    assert all("  " not in r.answer and "\n" not in r.answer for r in records)


def test_round_trip_through_megatron_indexed_dataset(sample_dataset):
    tok = load_tokenizer("gpt2")
    for split in SPLITS:
        rows = [json.loads(line) for line in open(f"{sample_dataset}_{split}.jsonl")]
        ds = IndexedDataset(f"{sample_dataset}_{split}")  # megatron-core's reader
        assert len(ds.document_indices) - 1 == len(rows) > 0
        for d, row in enumerate(rows):
            first, last = ds.document_indices[d], ds.document_indices[d + 1]
            assert last - first == 2, "each document is (prompt, answer)"
            prompt, answer = ds[first].tolist(), ds[first + 1].tolist()
            assert tok.decode(prompt) == format_prompt(row["question"])
            assert answer[-1] == tok.eod
            assert (
                tok.decode(prompt + answer)
                == format_example(row["question"], row["answer"]) + GPT2_EOS
            )
            assert set(row) == {"id", "question", "answer", "qtype", "source", "focus"}


def test_same_seed_gives_byte_identical_outputs(tmp_path, sample_dataset):
    again = tmp_path / "mq"
    preprocess_medquad(SAMPLE_DIR, str(again), valid_size=10, test_size=10, seed=1, progress=False)
    for suffix in [f"_{s}.{ext}" for s in SPLITS for ext in ("jsonl", "bin", "idx")] + [
        "_meta.json"
    ]:
        assert (
            Path(f"{again}{suffix}").read_bytes() == Path(f"{sample_dataset}{suffix}").read_bytes()
        )
    other = tmp_path / "other"
    preprocess_medquad(SAMPLE_DIR, str(other), valid_size=10, test_size=10, seed=2, progress=False)
    assert Path(f"{other}_test.jsonl").read_bytes() != Path(f"{again}_test.jsonl").read_bytes()


@pytest.mark.skipif(not FULL_MEDQUAD.is_dir(), reason="needs ../shared/data/MedQuAD")
def test_full_medquad_counts_and_leakage_free_splits(tmp_path):
    prefix = str(tmp_path / "full")
    report = preprocess_medquad(FULL_MEDQUAD, prefix, progress=False)
    assert report.files == 11_274 and report.pairs_read == 47_457
    assert report.answered_pairs == 16_423  # shared/notes/medquad.md, before deduplication
    assert report.dropped_empty_answer["2_GARD_QA"] == 5
    assert report.duplicates_dropped == 48
    assert report.split_pairs == {"train": 16_423 - 48 - 1000, "valid": 500, "test": 500}
    seen: dict[str, str] = {}
    for split in SPLITS:
        for line in open(f"{prefix}_{split}.jsonl"):
            row = json.loads(line)
            for key in (
                "q:" + normalize_question(row["question"]),
                "a:" + normalize_answer(row["answer"]),
            ):
                assert seen.setdefault(key, split) == split, f"{key[:80]!r} leaks across splits"
    assert_digests(prefix, FULL_DIGESTS)


def test_exact_duplicates_keep_the_first():
    records, _ = parse_medquad(SAMPLE_DIR)
    doubled = sorted(records + records[:3], key=lambda r: r.id)
    kept, dropped = drop_exact_duplicates(doubled)
    assert dropped == 3 and len(kept) == len(records)


def _copy_sample(tmp_path) -> Path:
    root = tmp_path / "in"
    shutil.copytree(SAMPLE_DIR, root)
    return root


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "malformed XML"),
        (
            lambda p: p.write_bytes(p.read_bytes().replace(b"Holmes", b"Holm\xe9s", 1)),
            "not valid UTF-8",
        ),
    ],
)
def test_bad_file_is_named_and_nothing_is_written(tmp_path, capsys, damage, message):
    root = _copy_sample(tmp_path)
    bad = root / "6_NINDS_QA" / "0000007.xml"
    damage(bad)
    out = tmp_path / "out" / "mq"
    out.parent.mkdir()
    (out.parent / "mq_train.jsonl").write_text("previous run\n")
    assert (
        preprocess_main(["--input", str(root), "--output-prefix", str(out), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["mq_train.jsonl"]
    assert (out.parent / "mq_train.jsonl").read_text() == "previous run\n"


def test_missing_or_empty_input_is_a_clear_error(tmp_path, capsys):
    assert preprocess_main(["--input", str(tmp_path / "nope"), "--output-prefix", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert preprocess_main(["--input", str(tmp_path / "empty"), "--output-prefix", "x"]) == 2
    assert "no .xml files" in capsys.readouterr().err


def test_unknown_root_element(tmp_path):
    bad = tmp_path / "x.xml"
    bad.write_text('<?xml version="1.0"?><Other/>')
    with pytest.raises(MedQuADError, match="unknown root element <Other>"):
        parse_file(bad)


def test_cached_gpt2_encoder_matches_transformers(tmp_path):
    """Our cached encoder against HF's GPT2TokenizerFast on every sample text and odd inputs."""
    from transformers import GPT2TokenizerFast

    from megatron_yuyuan.tokenizer import gpt2_bpe_files

    vocab, merges = gpt2_bpe_files()
    shutil.copy(vocab, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert hf("Question")["input_ids"] == [24361], "the reference tokenizer must not be empty"
    records, _ = parse_medquad(SAMPLE_DIR)
    texts = [format_example(r.question, r.answer) for r in records]
    texts += [
        "  leading spaces",
        "tabs\tand\nnewlines\n\n",
        "naïve café – 5°C ≥ 3µg",
        "it's we'll 1234",
    ]
    ours = load_tokenizer("gpt2").encode_batch(texts)
    assert ours == [hf(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("kind", ["hf_dir", "sentencepiece"])
def test_other_tokenizers_round_trip(tmp_path, kind):
    """--tokenizer HF_DIR and --tokenizer SP.model: megatron-core reads back the template text."""
    from megatron_yuyuan.tokenizer import gpt2_bpe_files

    if kind == "hf_dir":
        spec = tmp_path / "tok"
        spec.mkdir()
        vocab, merges = gpt2_bpe_files()
        shutil.copy(vocab, spec / "vocab.json")
        shutil.copy(merges, spec / "merges.txt")
        (spec / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
        )
    else:
        import sentencepiece as spm

        records, _ = parse_medquad(SAMPLE_DIR)
        text = tmp_path / "corpus.txt"
        text.write_text("\n".join(format_example(r.question, r.answer) for r in records))
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(tmp_path / "sp"),
            vocab_size=800,
            eos_id=2,
            bos_id=-1,
            pad_id=-1,
            unk_id=1,
            byte_fallback=True,
            character_coverage=1.0,
            minloglevel=2,
        )
        spec = tmp_path / "sp.model"
    prefix = tmp_path / "mq"
    preprocess_medquad(
        SAMPLE_DIR,
        str(prefix),
        tokenizer=str(spec),
        valid_size=5,
        test_size=5,
        seed=1,
        progress=False,
    )
    tok = load_tokenizer(str(spec))
    meta = json.loads(Path(f"{prefix}_meta.json").read_text())
    assert meta["tokenizer"] == str(spec) and meta["eod"] == tok.eod
    rows = [json.loads(line) for line in open(f"{prefix}_test.jsonl")]
    ds = IndexedDataset(f"{prefix}_test")
    for d, row in enumerate(rows):
        prompt, answer = ds[2 * d].tolist(), ds[2 * d + 1].tolist()
        assert answer[-1] == tok.eod
        assert tok.decode(prompt) == format_prompt(row["question"])
        text = tok.decode(prompt + answer[:-1])
        # sentencepiece normalises whitespace, so compare word by word
        assert text.split() == format_example(row["question"], row["answer"]).split()
