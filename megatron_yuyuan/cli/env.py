"""Print the versions, devices and optional accelerators found: paste it into an issue report.

yuyuan env            # aligned text
yuyuan env --json     # one JSON object
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from megatron_yuyuan.cli import ArgumentParser, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="yuyuan env", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = p.parse_args(argv)

    def body() -> None:
        from megatron_yuyuan.environment import report

        sections = report()
        if args.json:
            print(json.dumps({name: dict(rows) for name, rows in sections}, indent=2))
            return
        width = max(len(key) for _, rows in sections for key, _ in rows)
        for name, rows in sections:
            print(f"{name}:")
            for key, value in rows:
                print(f"  {key:<{width}}  {value}")

    return run_cli(body)
