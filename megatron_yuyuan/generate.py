"""``python -m megatron_yuyuan.generate``: see :mod:`megatron_yuyuan.cli.generate`."""

import sys

from megatron_yuyuan.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
