"""The ``yuyuan`` command and the repository's scripts: what a newcomer types first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

YUYUAN = Path(sys.executable).parent / "yuyuan"  # the console script pip installed


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_yuyuan_help_lists_every_command():
    from megatron_yuyuan.cli.main import COMMANDS

    proc = run(str(YUYUAN), "--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("commands:\n")[1].splitlines()]
    assert listed == list(COMMANDS)
    for name in ("preprocess", "finetune", "generate", "eval", "evaluate", "serve", "to-hf",
                 "to-megatron", "env"):  # fmt: skip
        assert name in listed


def test_yuyuan_env_reports_versions_devices_and_accelerators():
    import torch

    proc = run(str(YUYUAN), "env", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["packages"]["torch"] == torch.__version__
    assert report["devices"]["CUDA available"] == str(torch.cuda.is_available())
    assert set(report["optional accelerators"]) == {"apex", "transformer_engine", "flash_attn"}
    text = run(str(YUYUAN), "env").stdout
    assert "torch  " in text and torch.__version__ in text and "megatron-core" in text


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bogus"], ["unknown command 'bogus'", "yuyuan --help"]),
        (["to-hf", "--load", "x"], ["--out", "yuyuan to-hf --help"]),
        (["finetune", "--no-such-flag"], ["--no-such-flag", "yuyuan finetune --help"]),
    ],
)
def test_yuyuan_bad_input_is_one_error_line(argv, words):
    proc = run(sys.executable, "-m", "megatron_yuyuan", *argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0]


def test_a_subcommand_is_the_same_cli_as_its_module(tmp_path):
    """``yuyuan preprocess`` runs tools.preprocess_qa's CLI: same flags, same files."""
    data = tmp_path / "faq.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"question": f"What is condition {i} ?", "answer": f"Condition {i} is rare."}
            )
            + "\n"
            for i in range(40)
        )
    )
    proc = run(str(YUYUAN), "preprocess", "--input", str(data), "--output-prefix",
               str(tmp_path / "mine"), "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mine_train.bin").is_file() and (tmp_path / "mine_test.jsonl").is_file()
    assert str(tmp_path / "mine_train.bin") in proc.stdout  # it says what it wrote


@pytest.mark.parametrize(
    "script", ["tools/preprocess_medquad.py", "tools/preprocess_qa.py",
               "checkpoints_convert/to_hf.py", "checkpoints_convert/to_megatron.py"],
)  # fmt: skip
def test_repository_scripts_run_as_plain_scripts(script):
    proc = run(sys.executable, script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")
