"""A careless user and a hostile machine: bad input gets one ``error:`` line and exit 2, nothing the
user had is deleted or overwritten, and no run trains on garbage silently.

Every case uses real files; the kill -9 cases use real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from checkpoints_convert.to_hf import main as to_hf
from checkpoints_convert.to_megatron import main as to_megatron
from conftest import REPO, read_metrics, write_gpt2
from megatron_yuyuan.eval_qa import main as eval_qa
from megatron_yuyuan.evaluate import main as evaluate
from megatron_yuyuan.finetune import main as finetune
from megatron_yuyuan.generate import main as generate
from tools.preprocess_medquad import main as preprocess

# A directory nobody may create files in, even root (sysfs refuses new entries).
UNWRITABLE = Path("/sys/megatron_yuyuan_test")

TINY = ["--config", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2"]
TINY += ["--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1"]


def one_error_line(capsys, *words: str) -> str:
    """stderr holds exactly one ``error:`` line (no traceback), naming every word given."""
    err = capsys.readouterr().err
    errors = [ln for ln in re.split(r"[\r\n]", err) if ln.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what must survive untouched."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run with checkpoints at iterations 2 and 4 (cosine decay to lr 0)."""
    root = tmp_path_factory.mktemp("run")
    ckpt = root / "ckpt"
    args = [*TINY, "--train-iters", "4", "--save", str(ckpt), "--save-interval", "2"]
    assert finetune([*args, "--metrics-file", str(root / "m.jsonl")]) == 0
    return ckpt


@pytest.fixture(scope="module")
def gpt2_models(tmp_path_factory):
    """A tiny GPT-2-vocabulary HF model (32 positions) and its megatron-core conversion."""
    root = tmp_path_factory.mktemp("models")
    write_gpt2(root / "hf", positions=32, hidden=32, layers=1, heads=2)
    assert to_megatron(["--hf-dir", str(root / "hf"), "--save", str(root / "mc")]) == 0
    (root / "q.jsonl").write_text(json.dumps({"id": "1", "question": "What is glaucoma ?"}) + "\n")
    return root


def _finetune_process(save: Path, save_interval: int) -> subprocess.Popen:
    """A 400-iteration tiny finetune saving to ``save``, in a session of its own (so that a test
    sees every process it starts); stderr is piped."""
    from conftest import TORCHRUN_ENV

    args = [*TINY, "--train-iters", "400", "--save", str(save)]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_yuyuan.finetune",
            *args,
            "--save-interval",
            str(save_interval),
        ],
        env=TORCHRUN_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# --- 2. never destroy or corrupt what the user has ------------------------------------------------
def test_to_hf_refuses_the_checkpoint_itself_and_unrelated_folders(trained, tmp_path, capsys):
    before = tree(trained)
    assert to_hf(["--load", str(trained), "--out", str(trained)]) == 2
    one_error_line(capsys, str(trained), "checkpoint")
    assert to_hf(["--load", str(trained), "--out", str(trained / "iter_0000004")]) == 2
    one_error_line(capsys, "checkpoint")
    assert tree(trained) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert to_hf(["--load", str(trained), "--out", str(mine)]) == 2
    one_error_line(capsys, str(mine), "not empty")
    assert tree(mine) == {"notes.txt": b"my notes"}


def test_to_hf_replaces_its_own_export_and_keeps_added_files(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert to_hf(["--load", str(trained / "iter_0000002"), "--out", str(out)]) == 0
    first = tree(out)
    (out / "README.md").write_text("model card")
    assert to_hf(["--load", str(trained), "--out", str(out)]) == 0
    second = tree(out)
    assert second["README.md"] == b"model card"
    assert second["model.safetensors"] != first["model.safetensors"]  # iteration 4's weights
    assert json.loads(second["megatron_yuyuan_export.json"])["iteration"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_to_megatron_refuses_a_directory_holding_a_training_run(
    gpt2_models, trained, tmp_path, capsys
):
    before = tree(trained)
    rc = to_megatron(["--hf-dir", str(gpt2_models / "hf"), "--save", str(trained)])
    assert rc == 2
    one_error_line(capsys, str(trained), "already holds checkpoints")
    assert tree(trained) == before


KILLED_PREPROCESS = textwrap.dedent("""
    import os, pathlib, signal, sys
    real = pathlib.Path.replace
    calls = []
    def dying_replace(self, target):
        calls.append(target)
        # two renames per file (the earlier one aside, the new one in): two files of the new
        # run published, the third moved aside, the rest not
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, target)
    pathlib.Path.replace = dying_replace
    from tools.preprocess_medquad import main
    sys.exit(main(sys.argv[1:]))
""")


def test_preprocess_killed_while_publishing_is_detected_and_cleaned(tmp_path, capsys):
    prefix = tmp_path / "data" / "mq"
    common = ["--output-prefix", str(prefix), "--no-progress", "--workers", "1"]
    assert preprocess([*common, "--valid-size", "10", "--test-size", "10", "--seed", "1"]) == 0
    capsys.readouterr()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_PREPROCESS,
            *common,
            "--valid-size",
            "5",
            "--test-size",
            "5",
            "--seed",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(prefix.parent.glob(".mq_*.tmp*")), "the kill left temporaries behind"
    # Every reader refuses the mixed set instead of training on it.
    args = ["--config", "tiny", "--vocab-size", "50257", "--data-prefix", str(prefix)]
    assert finetune([*args, "--train-iters", "1", "--seq-length", "64"]) == 2
    one_error_line(capsys, "rerun", "preprocess_medquad")
    # ... evaluation too: a mixed "training" file could hold the test questions
    preds = tmp_path / "p.jsonl"
    test_rows = [json.loads(x) for x in open(f"{prefix}_test.jsonl")]
    preds.write_text(
        "".join(json.dumps({"id": r["id"], "prediction": "x"}) + "\n" for r in test_rows)
    )
    ev = ["--references", f"{prefix}_test.jsonl", "--predictions", f"m={preds}"]
    ev += ["--out", str(tmp_path / "ev"), "--train-data", f"{prefix}_train.jsonl"]
    assert evaluate(ev) == 2
    one_error_line(capsys, "different or interrupted runs")
    assert not (tmp_path / "ev" / "report.md").exists()
    # The next run removes the dead run's temporaries and publishes a consistent set.
    assert preprocess([*common, "--valid-size", "5", "--test-size", "5", "--seed", "2"]) == 0
    assert not list(prefix.parent.glob(".mq_*.tmp*"))
    from megatron_yuyuan.data.indexed import verify_split

    for split in ("train", "valid", "test"):
        verify_split(f"{prefix}_{split}")


# --- 3. never train on garbage silently -----------------------------------------------------------
def test_token_ids_outside_the_vocabulary_are_refused(sample_dataset, capsys):
    # GPT-2 ids (up to 50k) into the 1100-id tiny model: at TP=2 this used to train on NaN.
    args = ["--config", "tiny", "--data-prefix", sample_dataset, "--train-iters", "1"]
    assert finetune([*args, "--seq-length", "64", "--tensor-model-parallel-size", "1"]) == 2
    one_error_line(capsys, sample_dataset, "1100")


def test_a_nan_loss_stops_the_run_before_saving(tmp_path, capsys):
    save = tmp_path / "ckpt"
    rc = finetune(
        [*TINY, "--train-iters", "6", "--lr", "1e30", "--lr-warmup-iters", "0"]
        + ["--clip-grad", "0", "--save", str(save), "--save-interval", "1"]
    )
    assert rc == 2
    line = one_error_line(capsys, "iteration")
    assert "nan" in line or "inf" in line
    last = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert f"iteration {last + 1}:" in line  # the failing step was never saved


def test_resume_with_another_global_batch_size_continues_the_data(trained, tmp_path):
    from megatron_yuyuan.data.batching import micro_batch_indices

    run = tmp_path / "ckpt"
    run.mkdir()
    os.symlink(trained / "iter_0000002", run / "iter_0000002")
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    metrics = tmp_path / "m.jsonl"
    args = [*TINY, "--global-batch-size", "8", "--train-iters", "3", "--load", str(run)]
    assert finetune([*args, "--metrics-file", str(metrics)]) == 0
    (row,) = read_metrics(metrics)
    assert row["iteration"] == 3 and row["consumed_samples"] == 2 * 4 + 8
    # the step after 8 samples reads samples 8..15, not 16..23 (iteration x new batch size)
    it = micro_batch_indices(
        consumed_samples=8, global_batch_size=8, micro_batch_size=2, dp_size=1, dp_rank=0
    )
    assert [next(it) for _ in range(4)] == [[8, 9], [10, 11], [12, 13], [14, 15]]


def test_resume_with_more_iterations_follows_the_new_schedule(trained, tmp_path, capsys):
    """The config's schedule wins by default; the checkpoint's one trains at lr 0 and says so."""
    for flag, positive in (([], True), (["--use-checkpoint-opt-param-scheduler"], False)):
        run = tmp_path / f"ckpt{len(flag)}"
        run.mkdir()
        os.symlink(trained / "iter_0000004", run / "iter_0000004")
        (run / "latest_checkpointed_iteration.txt").write_text("4")
        metrics = tmp_path / f"m{len(flag)}.jsonl"
        args = [*TINY, "--train-iters", "8", "--load", str(run), "--metrics-file", str(metrics)]
        assert finetune([*args, *flag]) == 0
        lrs = [m["lr"] for m in read_metrics(metrics) if "lr" in m]
        assert len(lrs) == 4
        assert (lrs[0] > 1e-4) is positive, lrs
        err = capsys.readouterr().err
        assert ("learning rate 0" in err) is (not positive), err


def test_resumed_metrics_keep_one_row_per_iteration(trained, tmp_path):
    run = tmp_path / "ckpt"
    run.mkdir()
    os.symlink(trained / "iter_0000002", run / "iter_0000002")
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    metrics = tmp_path / "m.jsonl"
    killed = [{"iteration": i, "loss": 9.0} for i in (1, 2, 3)] + [{"iteration": 4, "loss": 9.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in killed) + '{"iteration": 5, "lo')
    assert (
        finetune([*TINY, "--train-iters", "4", "--load", str(run), "--metrics-file", str(metrics)])
        == 0
    )
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] != 9.0  # iteration 3 is the resumed run's, not the killed run's


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--valid-size", "60", "--test-size", "60"], ["--valid-size 60", "--test-size 60", "114"]),
        (["--valid-size", "-1"], ["--valid-size", ">= 0"]),
        (["--workers", "0"], ["--workers", ">= 1"]),
    ],
    ids=["sizes-exceed-data", "negative-size", "no-workers"],
)
def test_preprocess_refuses_impossible_sizes(tmp_path, capsys, flags, words):
    prefix = tmp_path / "mq"
    assert exit_code(preprocess, ["--output-prefix", str(prefix), "--no-progress", *flags]) == 2
    one_error_line(capsys, *words)
    assert not list(tmp_path.iterdir())


def exit_code(main, argv) -> int:
    """A CLI's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# --- 4. one line, not a traceback -----------------------------------------------------------------
@pytest.mark.parametrize(
    "pointer, words",
    [("", ["is empty"]), ("abc\n", ["corrupt"]), ("7", ["iter_0000007", "missing"])],
    ids=["empty", "corrupt", "dangling"],
)
def test_a_broken_latest_pointer_is_one_line_everywhere(trained, tmp_path, capsys, pointer, words):
    run = tmp_path / "ckpt"
    run.mkdir()
    os.symlink(trained / "iter_0000002", run / "iter_0000002")
    (run / "latest_checkpointed_iteration.txt").write_text(pointer)
    for main, argv in (
        (finetune, [*TINY, "--train-iters", "3", "--load", str(run)]),
        (to_hf, ["--load", str(run), "--out", str(tmp_path / "hf")]),
        (generate, ["--load", str(run), "--question", "Is it inherited ?"]),
    ):
        assert main(argv) == 2
        one_error_line(capsys, "latest_checkpointed_iteration.txt", "iter_0000002", *words)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("suffix", ["idx", "bin"])
def test_a_truncated_dataset_file_is_one_line(sample_dataset, tmp_path, capsys, suffix):
    prefix = tmp_path / "mq"
    for f in Path(sample_dataset).parent.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = Path(f"{prefix}_train.{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    args = ["--config", "tiny", "--vocab-size", "50257", "--data-prefix", str(prefix)]
    assert finetune([*args, "--train-iters", "1", "--seq-length", "64"]) == 2
    one_error_line(capsys, str(path), "truncated")


def test_an_empty_validation_split_is_refused_before_training(tmp_path, capsys):
    prefix = tmp_path / "mq"
    assert (
        preprocess(
            [
                "--output-prefix",
                str(prefix),
                "--no-progress",
                "--valid-size",
                "0",
                "--test-size",
                "5",
            ]
        )
        == 0
    )
    capsys.readouterr()
    args = ["--config", "tiny", "--vocab-size", "50257", "--data-prefix", str(prefix)]
    assert (
        finetune([*args, "--train-iters", "1", "--seq-length", "64", "--eval-interval", "1"]) == 2
    )
    one_error_line(capsys, "valid split is empty")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    metrics = tmp_path / "m.jsonl"
    for save in (a_file / "ckpt", UNWRITABLE / "ckpt"):
        args = [*TINY, "--train-iters", "2", "--save", str(save), "--metrics-file", str(metrics)]
        assert finetune(args) == 2
        one_error_line(capsys, "--save", str(save))
        assert not metrics.exists()  # stopped before the first step
    for prefix in (a_file / "mq", UNWRITABLE / "mq"):
        assert preprocess(["--output-prefix", str(prefix), "--no-progress"]) == 2
        one_error_line(capsys, "--output-prefix", str(prefix.parent))
    assert a_file.read_text() == "x"


def test_generation_inputs_are_checked_before_generating(gpt2_models, tmp_path, capsys):
    hf, mc, questions = gpt2_models / "hf", gpt2_models / "mc", gpt2_models / "q.jsonl"
    assert generate(["--hf-dir", str(hf), "--question", "  "]) == 2
    one_error_line(capsys, "--question", "empty")
    # HF path: a prompt that leaves no position to generate is one line, as on the megatron path
    long_question = "What is " + "very " * 40 + "glaucoma ?"
    for model in (["--hf-dir", str(hf)], ["--load", str(mc)]):
        assert generate([*model, "--question", long_question]) == 2
        one_error_line(capsys, "32 positions", "shorten")
    # a prompt that fits generates up to the last position instead of failing
    assert generate(["--hf-dir", str(hf), "--question", "Is it ?", "--max-new-tokens", "500"]) == 0
    capsys.readouterr()
    bad_out = tmp_path / "file"
    bad_out.write_text("x")
    rc = generate(["--hf-dir", str(hf), "--input", str(questions), "--output", str(bad_out / "p")])
    assert rc == 2
    one_error_line(capsys, "--output", str(bad_out))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    assert (
        generate(["--hf-dir", str(hf), "--input", str(latin1), "--output", str(tmp_path / "p")])
        == 2
    )
    one_error_line(capsys, f"{latin1}:2", "UTF-8")
    assert not (tmp_path / "p").exists()


def test_eval_inputs_are_checked_before_generating(gpt2_models, tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"id": "1", "question": "What is glaucoma ?"}) + "\n")
    out = tmp_path / "eval"
    assert (
        eval_qa(["--hf-dir", str(gpt2_models / "hf"), "--references", str(refs), "--out", str(out)])
        == 2
    )
    one_error_line(capsys, f"{refs}:1", "'answer'")
    assert not out.exists()  # nothing generated
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "1", "prediction": "x"}\n')
    assert (
        evaluate(["--references", str(refs), "--predictions", f"a={preds}", "--out", str(out)]) == 2
    )
    one_error_line(capsys, "'answer'")


# --- a new user's tour (each found by probing the CLIs with bad input) ----------------------------
def test_bad_configs_name_the_file_and_the_field(tmp_path, capsys):
    cases = {
        "model: {preset: tiny, num_layers: two}\n": ["num_layers", "--num-layers", "int", "'two'"],
        "model: {preset: tiny, num_layers: 2.5}\n": ["num_layers", "int", "2.5"],
        "model: tiny\ntrain: {lr: null}\n": ["train.lr", "float", "None"],
        "model: 5\n": ["section 'model'", "mapping"],
        "model: tiny\ntrain:\n  - lr: 1\n": ["section 'train'", "mapping"],
        "model: {preset: nope}\n": ["unknown model preset 'nope'"],
    }
    for i, (text, words) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert exit_code(finetune, ["--config", str(path), "--mock-data"]) == 2
        one_error_line(capsys, str(path), *words)
    assert exit_code(finetune, ["--config", str(tmp_path), "--mock-data"]) == 2
    one_error_line(capsys, str(tmp_path), "is a directory")


def test_runs_never_overwrite_another_runs_files(trained, sample_dataset, tmp_path, capsys):
    before = tree(trained)
    assert finetune([*TINY, "--train-iters", "2", "--save", str(trained)]) == 2
    one_error_line(capsys, "--save", "already holds checkpoints", f"--load {trained}")
    data = Path(f"{sample_dataset}_train.jsonl")
    kept = data.read_bytes()
    assert finetune([*TINY, "--train-iters", "2", "--metrics-file", str(data)]) == 2
    one_error_line(capsys, "--metrics-file", "does not resume")
    assert tree(trained) == before and data.read_bytes() == kept
    args = ["--config", "tiny", "--vocab-size", "50257", "--train-iters", "1"]
    assert finetune([*args, "--data-prefix", str(data)]) == 2
    one_error_line(capsys, f"--data-prefix {sample_dataset}")  # the prefix it should have been


def test_generate_and_convert_refuse_what_would_break(gpt2_models, tmp_path, capsys):
    hf, questions = gpt2_models / "hf", gpt2_models / "q.jsonl"
    kept = questions.read_bytes()
    argv = ["--hf-dir", str(hf), "--input", str(questions), "--output", str(questions)]
    assert generate(argv) == 2
    one_error_line(capsys, "--output", "--input file")
    assert questions.read_bytes() == kept
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert (
        generate(["--hf-dir", str(hf), "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    )
    one_error_line(capsys, str(empty), "no questions")
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"question": 5}\n')
    assert (
        generate(["--hf-dir", str(hf), "--input", str(typed), "--output", str(tmp_path / "o")]) == 2
    )
    one_error_line(capsys, f"{typed}:1", "int 5, not a string")
    q = ["--question", "Is it ?"]
    assert (
        generate(["--load", str(gpt2_models / "mc"), *q, "--tensor-model-parallel-size", "2"]) == 2
    )
    one_error_line(capsys, "--tensor-model-parallel-size 2", "torchrun --nproc-per-node 2")
    (tmp_path / "tok").mkdir()
    assert generate(["--hf-dir", str(hf), *q, "--tokenizer", str(tmp_path / "tok")]) == 2
    one_error_line(capsys, "--tokenizer", str(tmp_path / "tok"))
    bad = tmp_path / "badhf"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2]")
    assert to_megatron(["--hf-dir", str(bad), "--save", str(tmp_path / "mc")]) == 2
    one_error_line(capsys, str(bad / "config.json"), "JSON object")
    assert generate(["--hf-dir", str(bad), *q]) == 2
    one_error_line(capsys, "--hf-dir", str(bad))


def test_evaluate_refuses_ambiguous_or_mistyped_predictions(tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"id": "1", "answer": "a b"}\n{"id": "2", "answer": "c d"}\n')
    for rows, words in (
        (
            '{"id": "1", "prediction": 7}\n{"id": "2", "prediction": "c"}\n',
            ["'prediction'", "string"],
        ),
        (
            '{"id": "1", "prediction": "a"}\n{"id": "1", "prediction": "c"}\n',
            ["'1'", "more than once"],
        ),
    ):
        preds = tmp_path / "p.jsonl"
        preds.write_text(rows)
        assert (
            evaluate(
                [
                    "--references",
                    str(refs),
                    "--predictions",
                    f"s={preds}",
                    "--out",
                    str(tmp_path / "r"),
                ]
            )
            == 2
        )
        one_error_line(capsys, *words)


def test_generation_precision_flags(gpt2_models, capsys):
    """--bf16 loads the weights in bf16 (on the GPU when there is one); --fp16 needs a GPU."""
    from megatron_yuyuan.generation import HFGenerator

    gen = HFGenerator(str(gpt2_models / "hf"), dtype=torch.bfloat16)
    assert next(gen.model.parameters()).dtype == torch.bfloat16
    assert gen.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    q = ["--question", "Is it ?", "--max-new-tokens", "4"]
    assert generate(["--hf-dir", str(gpt2_models / "hf"), "--bf16", *q]) == 0
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert generate(["--hf-dir", str(gpt2_models / "hf"), "--fp16", *q]) == 2
        one_error_line(capsys, "--fp16", "GPU")


def test_review_findings_stay_fixed(trained, gpt2_models, tmp_path, capsys):
    # an export never replaces a file of the user's that happens to share a name with its own
    out = tmp_path / "hf"
    assert to_hf(["--load", str(trained), "--out", str(out)]) == 0
    assert not (out / "tokenizer.json").exists()  # tiny vocabulary: no tokenizer files exported
    (out / "tokenizer.json").write_text("my tokenizer")
    capsys.readouterr()
    tok = gpt2_models / "hf"  # a real tokenizer folder: this export would write tokenizer.json
    assert to_hf(["--load", str(trained), "--out", str(out), "--tokenizer", str(tok)]) == 2
    one_error_line(capsys, "tokenizer.json", "would replace")
    assert (out / "tokenizer.json").read_text() == "my tokenizer"
    (out / "megatron_yuyuan_export.json").write_text("{not json")
    assert to_hf(["--load", str(trained), "--out", str(out)]) == 2
    one_error_line(capsys, "megatron_yuyuan_export.json", "corrupt")
    assert (
        to_hf(["--load", str(trained), "--out", str(tmp_path / "o2"), "--tokenizer", str(tmp_path)])
        == 2
    )
    one_error_line(capsys, "--tokenizer", "no tokenizer there")
    # --finetune from a run into that same run would restart it at 0 over its checkpoints
    before = tree(trained)
    args = [*TINY, "--train-iters", "2", "--load", str(trained), "--save", str(trained)]
    assert finetune([*args, "--finetune"]) == 2
    one_error_line(capsys, "--save", "--finetune")
    assert tree(trained) == before
    # a question too long for the model, second in the file: refused before generating anything
    questions = tmp_path / "q.jsonl"
    long_q = "What is " + "very " * 40 + "glaucoma ?"
    questions.write_text(
        json.dumps({"question": "Is it ?"}) + "\n" + json.dumps({"question": long_q}) + "\n"
    )
    preds = tmp_path / "p.jsonl"
    argv = ["--hf-dir", str(gpt2_models / "hf"), "--input", str(questions), "--output", str(preds)]
    assert generate(argv) == 2
    one_error_line(capsys, "shorten")
    assert not preds.exists()


def test_an_edited_export_marker_cannot_delete_files_outside_out(trained, tmp_path):
    out = tmp_path / "hf"
    assert to_hf(["--load", str(trained / "iter_0000002"), "--out", str(out)]) == 0
    # every name an export writes is one the marker may list
    from megatron_yuyuan.convert.api import is_export_file_name

    listed = json.loads((out / "megatron_yuyuan_export.json").read_text())["files"]
    assert all(is_export_file_name(n) for n in listed if n != "megatron_yuyuan_export.json")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    inside = out / "notes.txt"
    inside.write_text("mine")
    marker = out / "megatron_yuyuan_export.json"
    data = json.loads(marker.read_text())
    data["files"] += ["../victim.txt", str(victim), "notes.txt", "..", "."]
    marker.write_text(json.dumps(data))
    before = tree(tmp_path / "hf")
    assert to_hf(["--load", str(trained), "--out", str(out)]) == 0
    assert victim.read_text() == "keep me" and inside.read_text() == "mine"
    assert tree(out)["model.safetensors"] != before["model.safetensors"]


def test_generate_output_never_replaces_a_file_it_did_not_write(
    trained, sample_dataset, tmp_path, capsys
):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is it?"}) + "\n")
    base = ["--load", str(trained), "--input", str(questions), "--max-new-tokens", "2"]
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "own data"}\n')
    pointer = trained / "latest_checkpointed_iteration.txt"
    targets = [
        (mine, "not a predictions file"),
        (pointer, "checkpoint folder"),
        (trained / "iter_0000002" / "run_config.yaml", "checkpoint folder"),
        (Path(f"{sample_dataset}_test.jsonl"), "file of the dataset"),
    ]
    before = {t: t.read_bytes() for t, _ in targets}
    for target, words in targets:
        assert generate([*base, "--output", str(target)]) == 2
        one_error_line(capsys, f"--output {target}", words)
        assert target.read_bytes() == before[target]
    # its own predictions file may be replaced, as before
    from megatron_yuyuan.cli.generate import check_output_file

    out = tmp_path / "pred.jsonl"
    row = {"question": "q", "prediction": "a", "generation": " a", "finish_reason": "eos"}
    out.write_text(json.dumps(row) + "\n")
    check_output_file(out)


def test_evaluate_never_overwrites_the_users_report_or_its_inputs(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    refs = out / "report.md"  # the user keeps references under a name the report uses
    rows = [{"id": str(i), "question": f"q{i}?", "answer": f"the answer {i}"} for i in range(6)]
    refs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "p.jsonl"
    preds.write_text(
        "".join(json.dumps({"id": r["id"], "prediction": r["answer"]}) + "\n" for r in rows)
    )
    args = ["--references", str(refs), "--predictions", f"ours={preds}", "--out", str(out)]
    before = tree(out)
    assert evaluate(args) == 2
    one_error_line(capsys, "report.md", "would be overwritten")
    assert tree(out) == before
    # a report.md the user wrote there (not an input) is not replaced either
    refs2 = tmp_path / "refs.jsonl"
    refs2.write_text(refs.read_text())
    refs.write_text("my notes")
    args = ["--references", str(refs2), "--predictions", f"ours={preds}", "--out", str(out)]
    assert evaluate(args) == 2
    one_error_line(capsys, "report.md", "did not write")
    assert refs.read_text() == "my notes"
    # a folder of our own reports is rewritten freely
    fresh = tmp_path / "fresh"
    args = ["--references", str(refs2), "--predictions", f"ours={preds}", "--out", str(fresh)]
    assert evaluate(args) == 0 and evaluate(args) == 0


def test_two_runs_never_share_a_save_folder_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    import time

    save = tmp_path / "ckpt"
    first = _finetune_process(save, save_interval=1000)
    try:
        deadline = time.time() + 60
        while not (save / ".megatron_yuyuan.lock").is_file() and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None
        before = tree(save)
        assert finetune([*TINY, "--train-iters", "2", "--save", str(save)]) == 2
        one_error_line(capsys, f"--save {save}", f"PID {first.pid}", "another run")
        assert tree(save) == before
    finally:
        first.kill()
        first.communicate()
    # the killed run's lock died with it: the folder is usable again at once
    assert finetune([*TINY, "--train-iters", "2", "--save", str(save / "new")]) == 0
    assert finetune([*TINY, "--train-iters", "2", "--save", str(save), "--load", str(save)]) == 0


def _hf_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _damage_cases():
    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])

    def nan(d):
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / "model.safetensors"))
        state["transformer.wte.weight"][3, 5] = float("nan")
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})

    def no_offsets(d):
        _edit_header(d / "model.safetensors", lambda h: h[_first_tensor(h)].pop("data_offsets"))

    def wrong_shape(d):
        def edit(h):
            h[_first_tensor(h)]["shape"] = [3, 3]

        _edit_header(d / "model.safetensors", edit)

    def huge_header(d):
        f = d / "model.safetensors"
        f.write_bytes((2**62).to_bytes(8, "little") + f.read_bytes()[8:])

    def index_without_map(d):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))

    def bin_of_strings(d):
        (d / "model.safetensors").unlink()
        torch.save({"transformer.wte.weight": "not a tensor"}, d / "pytorch_model.bin")

    def int8(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "int8"}))

    return [
        (truncate, "truncated"),
        (nan, "NaN/Inf"),
        (no_offsets, "data_offsets"),
        (wrong_shape, "needs"),
        (huge_header, "header length"),
        (index_without_map, "weight_map"),
        (bin_of_strings, "named tensors"),
        (int8, "int8"),
    ]


@pytest.mark.parametrize("damage, words", _damage_cases(), ids=lambda x: getattr(x, "__name__", x))
def test_a_damaged_hf_folder_never_converts_silently(gpt2_models, tmp_path, capsys, damage, words):
    hf = _hf_copy(gpt2_models / "hf", tmp_path / "hf")
    damage(hf)
    before = tree(tmp_path)
    assert to_megatron(["--hf-dir", str(hf), "--save", str(tmp_path / "mc")]) == 2
    one_error_line(capsys, words)
    assert tree(tmp_path) == before and not (tmp_path / "mc").exists()


def test_non_finite_weights_convert_only_when_allowed(gpt2_models, tmp_path, capsys):
    hf = _hf_copy(gpt2_models / "hf", tmp_path / "hf")
    _damage_cases()[1][0](hf)
    args = ["--hf-dir", str(hf), "--save", str(tmp_path / "mc"), "--allow-non-finite"]
    assert to_megatron(args) == 0


def test_resuming_an_older_iteration_of_the_run_names_what_it_replaces(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "ckpt"
    shutil.copytree(trained, run)
    args = [*TINY, "--train-iters", "3", "--save", str(run), "--load", str(run / "iter_0000002")]
    assert finetune(args) == 0
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if ln.startswith("warning: --load")]
    assert len(warning) == 1 and "iter_0000004" in warning[0] and "iteration 2" in warning[0]
    # resuming the latest iteration warns about nothing
    fresh = tmp_path / "fresh"
    shutil.copytree(trained, fresh)
    assert finetune([*TINY, "--train-iters", "5", "--save", str(fresh), "--load", str(fresh)]) == 0
    assert "warning: --load" not in capsys.readouterr().err


def fake_server():
    """The app over an engine that answers one EOS token, and a word tokenizer that, as a real
    one, cannot encode lone surrogates."""
    from megatron_yuyuan.serve.app import ServedModel, create_app
    from megatron_yuyuan.serve.scheduler import Scheduler
    from slow_server import StepEngine

    class Tok:
        eod = 0

        def encode(self, text):
            text.encode("utf-8")
            return [1] * len(text.split())

        def decode(self, ids):
            return " x" * len(ids)

    return create_app(Scheduler(StepEngine(0, max_positions=64)), Tok(), ServedModel("m", "x"))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--do-sample", "--temperature", "1e-300"], "--temperature must be in"),
        (["--do-sample", "--temperature", "5e-324"], "--temperature"),
        (["--do-sample", "--repetition-penalty", "1e-300"], "--repetition-penalty must be in"),
    ],
)
def test_sampling_values_that_would_break_generation_are_refused(gpt2_models, capsys, flags, words):
    for model in (["--load", str(gpt2_models / "mc")], ["--hf-dir", str(gpt2_models / "hf")]):
        assert generate([*model, "--question", "What is it?", "--max-new-tokens", "2", *flags]) == 2
        one_error_line(capsys, words)


def test_the_server_answers_bad_sampling_values_422():
    from fastapi.testclient import TestClient

    app = fake_server()
    with TestClient(app) as client:
        for body, param in (
            ({"temperature": 1e-300}, "temperature"),
            ({"temperature": 0.5, "repetition_penalty": 1e-300}, "repetition_penalty"),
        ):
            r = client.post("/api/answer", json={"question": "a b", "max_new_tokens": 2, **body})
            assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
        assert (
            client.post("/api/answer", json={"question": "a b", "max_new_tokens": 2}).status_code
            == 200
        )


def test_unpaired_surrogates_and_list_ids_are_one_line(gpt2_models, tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "1", "question": "What is \\udfff ?", "answer": "x"}\n')
    model = ["--hf-dir", str(gpt2_models / "hf"), "--max-new-tokens", "2"]
    assert generate([*model, "--input", str(bad), "--output", str(tmp_path / "p.jsonl")]) == 2
    one_error_line(capsys, f"{bad}:1", "surrogate")
    assert generate([*model, "--question", "What is \udfff ?"]) == 2
    one_error_line(capsys, "--question", "UTF-8")
    assert eval_qa([*model, "--references", str(bad), "--out", str(tmp_path / "e")]) == 2
    one_error_line(capsys, f"{bad}:1", "surrogate")
    refs = tmp_path / "r.jsonl"
    refs.write_text('{"id": [1, 2], "question": "q", "answer": "a"}\n')
    preds = tmp_path / "pp.jsonl"
    preds.write_text('{"id": [1, 2], "prediction": "a"}\n')
    args = ["--references", str(refs), "--predictions", f"m={preds}", "--out", str(tmp_path / "o")]
    assert evaluate(args) == 2
    one_error_line(capsys, "ids must be strings or integers")
    preds.write_text('{"id": [1, 2], "prediction": "\\udfff"}\n')
    assert evaluate(args) == 2
    one_error_line(capsys, "surrogate")


def test_the_server_refuses_unpaired_surrogates_and_still_answers():
    from fastapi.testclient import TestClient

    app = fake_server()
    with TestClient(app) as client:
        body = '{"question": "what \\udfff", "max_new_tokens": 2}'
        r = client.post("/api/answer", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.text
        r = client.post("/v1/completions", content='{"prompt": "\\ud800"}')
        assert r.status_code == 400
        assert (
            client.post("/api/answer", json={"question": "a b", "max_new_tokens": 2}).status_code
            == 200
        )


def test_a_save_folder_holding_only_an_unfinished_save_starts_again(tmp_path, capsys):
    save = tmp_path / "ckpt"
    (save / "iter_0000001.tmp").mkdir(parents=True)
    (save / "iter_0000001.tmp" / "half_written.distcp").write_bytes(b"x" * 100)
    args = [*TINY, "--train-iters", "2", "--save", str(save), "--load", str(save)]
    assert finetune(args) == 0
    assert "removed the unfinished save" in capsys.readouterr().out
    assert not (save / "iter_0000001.tmp").exists() and (save / "iter_0000002").is_dir()


def test_yaml_alias_bombs_and_foreign_encodings_are_one_line(tmp_path, capsys):
    import time

    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)
    ]
    lines += ["train:", "  save: *a11"]
    bomb.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    assert finetune(["--config", str(bomb)]) == 2
    one_error_line(capsys, str(bomb), "alias")
    assert time.perf_counter() - start < 10
    text = "model:\n  num_layers: 2\n# café\n"
    for name, data in (
        ("latin1.yaml", text.encode("latin-1")),
        ("utf16.yaml", text.encode("utf-16")),
    ):
        (tmp_path / name).write_bytes(data)
        assert finetune(["--config", str(tmp_path / name)]) == 2
        one_error_line(capsys, name, "UTF-")


def test_the_launcher_refuses_bad_environments_in_one_line(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        ({"NNODES": "abc"}, "NNODES=abc"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        ({"MASTER_PORT": str(port)}, "already in use"),
    ]
    try:
        for env, words in cases:
            proc = subprocess.run(
                ["bash", str(REPO / "run" / "finetune_qa.sh"), "--config", "tiny", "--mock-data"],
                env={**os.environ, "PYTHON": sys.executable, **env},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, (env, proc.stderr)
            assert lines[0].startswith("error:") and words in lines[0], lines
    finally:
        busy.close()


def _damage_checkpoint(ckpt: Path, how: str) -> None:
    shard = sorted(ckpt.glob("*.distcp"))[0]
    if how == "truncated":
        os.truncate(shard, 100)
    elif how == "zeroed":
        shard.write_bytes(bytes(shard.stat().st_size))
    elif how == "deleted":
        shard.unlink()
    elif how == "no-metadata":
        (ckpt / ".metadata").unlink()
    elif how == "common":
        os.truncate(ckpt / "common.pt", 10)


@pytest.mark.parametrize("how", ["truncated", "zeroed", "deleted", "no-metadata", "common"])
def test_a_damaged_latest_checkpoint_is_one_line_naming_an_older_one(
    trained, tmp_path, capsys, how
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _damage_checkpoint(run / "iter_0000004", how)
    before = tree(run)
    words = ("iter_0000004", "damaged", "iter_0000002")
    assert to_hf(["--load", str(run), "--out", str(tmp_path / "hf")]) == 2
    one_error_line(capsys, *words)
    assert finetune([*TINY, "--train-iters", "6", "--save", str(run), "--load", str(run)]) == 2
    one_error_line(capsys, *words)
    assert generate(["--load", str(run), "--max-new-tokens", "1", "--question", "hi"]) == 2
    one_error_line(capsys, *words)  # the weights load (and fail) before anything else
    assert tree(run) == before and not (tmp_path / "hf").exists()


def test_a_filesystem_without_locks_only_warns(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    save = tmp_path / "ckpt"
    assert finetune([*TINY, "--train-iters", "2", "--save", str(save)]) == 0
    assert "warning: --save" in capsys.readouterr().err and (save / "iter_0000002").is_dir()


# --- 8. an interrupt during a checkpoint save -------------------------------------------------
def _start_saving_run(save: Path, delay_s: float = 0.05) -> subprocess.Popen:
    """A finetune that saves every 3 iterations, returned once its first checkpoint is complete and
    the next save is being written."""
    import time

    run = _finetune_process(save, save_interval=3)
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None:
        if (save / "latest_checkpointed_iteration.txt").is_file() and list(save.glob("*.tmp")):
            time.sleep(delay_s)  # into the save
            return run
        time.sleep(0.002)
    run.kill()
    raise AssertionError(f"the run never started its second save: {run.communicate()[1][-2000:]}")


def _session_processes(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-e", "-o", "sid=,pid=,args="], capture_output=True, text=True)
    return [ln for ln in ps.stdout.splitlines() if ln.split()[0] == str(sid)]


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.05])
def test_ctrl_c_during_a_save_exits_130_and_keeps_the_previous_checkpoint(
    tmp_path, capsys, delay_s
):
    import time

    save = tmp_path / "ckpt"
    run = _start_saving_run(save, delay_s)
    previous = (save / "latest_checkpointed_iteration.txt").read_text()
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    started = time.time()
    try:
        _, err = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 130, err[-3000:]
    assert time.time() - started < 10
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: interrupted"] and "Traceback" not in err, err[-3000:]
    assert _session_processes(run.pid) == []
    # the save that was cut is gone, the pointer still names the previous one, which resumes
    assert not list(save.glob("*.tmp"))
    assert (save / "latest_checkpointed_iteration.txt").read_text() == previous
    resume = [*TINY, "--train-iters", str(int(previous) + 1), "--save", str(save)]
    assert finetune([*resume, "--load", str(save)]) == 0
    assert f"resuming at iteration {previous} " in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_trainer_killed_during_a_save_leaves_no_process_behind(tmp_path, sig):
    import time

    save = tmp_path / "ckpt"
    run = _start_saving_run(save)
    previous = (save / "latest_checkpointed_iteration.txt").read_text()
    os.kill(run.pid, sig)  # the trainer only, as a scheduler or the OOM killer does
    run.communicate(timeout=30)
    deadline = time.time() + 5
    while _session_processes(run.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert _session_processes(run.pid) == []
    assert (save / "latest_checkpointed_iteration.txt").read_text() == previous


# --- 11. a full disk ----------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the requested size mounted under ``tmp_path`` (root only: skipped otherwise)."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs to fill needs root")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)])
        if done.returncode != 0:
            pytest.skip("this machine refuses tmpfs mounts (no CAP_SYS_ADMIN)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(small_disk, capsys):
    disk = small_disk("6m")  # one tiny training checkpoint (3.7 MB) fits, a second does not
    save = disk / "ckpt"
    args = [*TINY, "--train-iters", "4", "--save", str(save), "--save-interval", "2"]
    assert finetune(args) == 2
    one_error_line(capsys, f"{save}/iter_0000004.tmp/", "no space left", " free there", "removed")
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_a_disk_that_fills_during_a_conversion_is_one_line(trained, small_disk, tmp_path, capsys):
    before = tree(trained)
    disk = small_disk("300k")
    assert to_hf(["--load", str(trained), "--out", str(disk / "hf")]) == 2
    one_error_line(capsys, f"{disk}/.hf.tmp.", "model", ".safetensors", "no space left", "removed")
    assert list(disk.iterdir()) == []
    assert tree(trained) == before

    assert to_hf(["--load", str(trained), "--out", str(tmp_path / "hf")]) == 0
    assert to_megatron(["--hf-dir", str(tmp_path / "hf"), "--save", str(disk / "mc")]) == 2
    one_error_line(capsys, f"{disk}/mc/iter_0000000.tmp/", "no space left", "removed")
    assert [p.name for p in (disk / "mc").iterdir()] == []


def test_a_disk_that_fills_when_the_pointer_moves_takes_the_new_checkpoint_back(
    tmp_path, capsys, monkeypatch
):
    import errno

    from megatron_yuyuan.checkpoint import storage

    real = storage.write_text_atomic

    def full_disk(path, text):
        if Path(path).name == storage.LATEST:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(storage, "write_text_atomic", full_disk)
    save = tmp_path / "ckpt"
    assert finetune([*TINY, "--train-iters", "2", "--save", str(save)]) == 2
    one_error_line(capsys, f"{save / storage.LATEST}: no space left", "iter_0000002 was removed")
    assert not [p.name for p in save.iterdir() if p.name.startswith(("iter_", "latest"))]


def test_an_export_without_tokenizer_files_is_refused_before_serving(trained, tmp_path, capsys):
    # a --mock-data model has no GPT-2 vocabulary, so its export carries no tokenizer files:
    # transformers still builds a "tokenizer" there that encodes every question to nothing
    assert to_hf(["--load", str(trained), "--out", str(tmp_path / "hf")]) == 0
    assert not (tmp_path / "hf" / "vocab.json").exists()
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is glaucoma ?"}) + "\n")
    capsys.readouterr()
    args = ["--hf-dir", str(tmp_path / "hf"), "--input", str(questions)]
    assert generate([*args, "--output", str(tmp_path / "out.jsonl")]) == 2
    one_error_line(capsys, f"{tmp_path / 'hf'} is empty", "--tokenizer")
    assert not (tmp_path / "out.jsonl").exists()
