"""``python -m megatron_yuyuan.eval_qa``: see :mod:`megatron_yuyuan.cli.eval_qa`."""

import sys

from megatron_yuyuan.cli.eval_qa import main

if __name__ == "__main__":
    sys.exit(main())
