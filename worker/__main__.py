"""``python -m worker``: the worker CLI."""

from worker.cli import main

raise SystemExit(main())
