"""``python -m experiments.bench``: the bench's entry point (also the fresh-process child)."""

import sys

from .main import main

sys.exit(main())
