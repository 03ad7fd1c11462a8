"""``python -m tools.preprocess_qa``: your own QA data (any format, chats) -> QA splits
(JSONL + ``.bin/.idx``).

    python -m tools.preprocess_qa --input faq.jsonl --output-prefix data/mine

See :mod:`megatron_yuyuan.cli.preprocess_qa` for the flags.
"""

import sys

from megatron_yuyuan.cli.preprocess_qa import main

if __name__ == "__main__":
    sys.exit(main())
