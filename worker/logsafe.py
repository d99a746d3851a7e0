"""Values from requests and manifests, made safe to put in a log line."""

from __future__ import annotations


def loggable(value: object) -> str:
    """``str(value)`` with every character that is not printable (newlines, carriage returns, escape
    sequences, Unicode line separators, undecodable bytes) written as its escape, so a value taken
    from a request or a manifest can never start a log line of its own or rewrite the terminal."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text
    )
