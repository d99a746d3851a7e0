"""``python -m compare``: the ``esrfarm compare`` command."""

from compare.cli import main

raise SystemExit(main())
