"""``python -m service``: ``esrfarm serve``, ``submit``, ``jobs``, ``show``, ``cancel``, ``retry``."""

from service.cli import main

raise SystemExit(main())
