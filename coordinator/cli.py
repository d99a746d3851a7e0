"""The ``esrfarm`` command.

``esrfarm worker`` and ``esrfarm models`` belong to the worker side; they run as
``python -m worker ...`` in this same process image (``exec``), so the coordinator never imports
worker code: the two sides meet only in ``manifests`` and on disk/HTTP.
"""

from __future__ import annotations

import argparse
import os
import sys

WORKER_COMMANDS = {"worker": [], "models": ["models"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esrfarm",
        description="Upscale videos with Real-ESRGAN on a farm of GPU worker processes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("worker", help="run one worker service (see: esrfarm worker --help)", add_help=False)
    sub.add_parser("models", help="list and fetch models (see: esrfarm models --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in WORKER_COMMANDS:
        worker_argv = [sys.executable, "-m", "worker", *WORKER_COMMANDS[args[0]], *args[1:]]
        sys.stdout.flush()
        os.execv(sys.executable, worker_argv)
    parser = build_parser()
    parser.parse_args(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
