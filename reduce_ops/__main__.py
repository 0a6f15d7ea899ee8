"""`python -m reduce_ops` is the `reduce-ops` command (used by MLproject entry points)."""

import sys

from reduce_ops.cli import main

sys.exit(main())
