"""``python -m checkpoints_convert.to_megatron``: see :mod:`megatron_yuyuan.cli.to_megatron`."""

import sys

from megatron_yuyuan.cli.to_megatron import main

if __name__ == "__main__":
    sys.exit(main())
