"""`python -m memtrace ...`: the same as the `memtrace` console script (memtrace/cli.py)."""
from .cli import main

raise SystemExit(main())
