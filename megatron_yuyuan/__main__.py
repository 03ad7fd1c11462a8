"""``python -m megatron_yuyuan``: the ``yuyuan`` command."""

import sys

from megatron_yuyuan.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
