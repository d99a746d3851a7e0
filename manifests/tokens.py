"""The workers' bearer token, read the same way by the workers and by whoever calls them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from manifests.errors import ProtocolError

#: The token itself, when no token file is given.
TOKEN_ENV = "ESRFARM_WORKER_TOKEN"


class TokenError(ProtocolError, ValueError):
    """A token file that cannot be used (unreadable or empty); the message names it."""


def read_token(token_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from ``token_file`` (stripped), else from ``$ESRFARM_WORKER_TOKEN``, else None."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise TokenError(f"cannot read the token file {token_file}: {reason}") from None
        if not token:
            raise TokenError(f"the token file {token_file} is empty")
        return token
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    return token or None
