"""``python -m megatron_yuyuan.evaluate``: see :mod:`megatron_yuyuan.cli.evaluate`."""

import sys

from megatron_yuyuan.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
