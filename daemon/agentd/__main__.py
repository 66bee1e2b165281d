"""``python -m agentd``: the same entry point as the ``agentd`` console script."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
