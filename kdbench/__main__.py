"""``python -m kdbench``."""

from __future__ import annotations

import sys

from kdbench.cli.main import main

sys.exit(main())
