"""``python -m checkpoints_convert.to_hf``: see :mod:`megatron_yuyuan.cli.to_hf`."""

import sys

from megatron_yuyuan.cli.to_hf import main

if __name__ == "__main__":
    sys.exit(main())
