"""``python -m megatron_yuyuan.finetune``: see :mod:`megatron_yuyuan.cli.finetune`."""

import sys

from megatron_yuyuan.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
