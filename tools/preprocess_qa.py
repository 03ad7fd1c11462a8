"""``python -m tools.preprocess_qa``: your own QA data (any format, chats) -> QA splits
(JSONL + ``.bin/.idx``).

    python -m tools.preprocess_qa --input faq.jsonl --output-prefix data/mine

See :mod:`megatron_yuyuan.cli.preprocess_qa` for the flags.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: python tools/preprocess_qa.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_yuyuan.cli.preprocess_qa import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
