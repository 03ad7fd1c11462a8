"""Apex and Transformer Engine are optional: with both made unimportable, training runs and
nothing is printed about them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("apex", "transformer_engine", "amp_C"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from megatron_yuyuan.finetune import main
    rc = main(["--config", "tiny", "--mock-data", "--seq-length", "32", "--train-iters", "2",
               "--micro-batch-size", "2", "--global-batch-size", "4", "--metrics-file", "m.jsonl",
               "--recompute-granularity", "full"])
    assert "apex" not in sys.modules and "transformer_engine" not in sys.modules
    sys.exit(rc)
""")


def test_runs_without_apex_or_transformer_engine(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    lowered = out.lower()
    for word in ("apex", "transformer engine", "transformer_engine", "traceback"):
        assert word not in lowered, f"output mentions {word!r}:\n{out[-3000:]}"
