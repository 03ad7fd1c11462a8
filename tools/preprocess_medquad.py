"""``python -m tools.preprocess_medquad``: MedQuAD XML -> QA splits (JSONL + ``.bin/.idx``).

    python -m tools.preprocess_medquad --input MedQuAD --output-prefix data/medquad

See :mod:`megatron_yuyuan.cli.preprocess` for the flags.
"""

import sys

from megatron_yuyuan.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
