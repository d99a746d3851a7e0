"""How fast a manifest and a status file are decoded and validated, and what a bad one is told.

Times ``Manifest.from_json`` and ``Status.from_json`` (whatever the checkout implements) on a
realistic document against ``orjson.loads`` alone (the floor: parsing with no checks), and says
whether pydantic is installed (it is not a dependency and was not installed to compare). Then
prints the error each decoder gives for a few bad documents: a wrong type, a value out of range,
an unknown field, a missing field. Figures: benchmarks/RESULTS.md ("Decoding the protocol").

    python benchmarks/protocol_decode.py [--batches 560] [--repeat 100]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from manifests import Batch, BatchError, DocumentError, Manifest, Status, WorkerIdentity, WorkerState


def realistic_manifest(batches: int) -> bytes:
    """One of four workers' share of a 10-minute 30 fps job in batches of 8: every 4th batch."""
    dealt = [Batch.range(i * 4, 1 + i * 32, 9 + i * 32) for i in range(batches)]
    return Manifest(
        job_id="clip-2024",
        manifest_id="w0",
        worker_id="gpu-host-1:8090",
        model="realesr-animevideov3",
        scale=2.0,
        batches=tuple(dealt),
    ).to_json()


def realistic_status(batches: int) -> bytes:
    done = tuple(i * 4 for i in range(batches - 2))
    return Status(
        state=WorkerState.PROCESSING,
        worker=WorkerIdentity("gpu-host-1:8090", "gpu-host-1", 4242, "0", "NVIDIA H100 80GB HBM3"),
        updated_at=1718000004.2,
        job_id="clip-2024",
        manifest_id="w0",
        batches_total=batches,
        done_batches=done,
        current_batch=(batches - 2) * 4,
        frames_total=batches * 8,
        frames_done=len(done) * 8,
        errors=(BatchError(9999, 73, "input frame input/00000073.png is missing"),),
        started_at=1718000000.0,
    ).to_json()


def per_second(decode: Callable[[bytes], Any], data: bytes, repeat: int, rounds: int = 5) -> float:
    """Decodes per second, the best of ``rounds`` (the machine is shared: the best is the least disturbed)."""
    decode(data)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            decode(data)
        best = min(best, time.perf_counter() - start)
    return repeat / best


def bad_documents(good: bytes) -> dict[str, bytes]:
    def changed(**changes: Any) -> bytes:
        document = json.loads(good)
        for key, value in changes.items():
            if value is ...:
                del document[key]
            else:
                document[key] = value
        return json.dumps(document).encode()

    document = json.loads(good)
    batches = document["batches"]
    return {
        "wrong type (tile is a string)": changed(tile="256"),
        "out of range (scale 32)": changed(scale=32.0),
        "out of range (batch end past the last frame index)": changed(
            batches=[*batches[:-1], {"id": batches[-1]["id"], "start": 1, "end": 10**9}]
        ),
        "unknown field": changed(colour="blue"),
        "unknown field in a batch": changed(batches=[{**batches[0], "step": 2}, *batches[1:]]),
        "missing field (model)": changed(model=...),
        "wrong format": changed(format="esrfarm.manifest/9"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=560, help="batches in the manifest (default 560)")
    parser.add_argument("--repeat", type=int, default=100, help="decodes per round (best of 5 rounds)")
    args = parser.parse_args()

    manifest, status = realistic_manifest(args.batches), realistic_status(args.batches)
    print(f"manifest: {len(manifest)} bytes, {args.batches} batches; status: {len(status)} bytes")
    print(f"{'decoder':<28} {'manifest/s':>12} {'status/s':>12}")
    rows: list[tuple[str, Callable[[bytes], Any], Callable[[bytes], Any]]] = [
        ("orjson.loads (no checks)", orjson.loads, orjson.loads),
        ("esrfarm (this checkout)", Manifest.from_json, Status.from_json),
    ]
    if importlib.util.find_spec("pydantic") is None:
        print("(pydantic is not installed here, so there is no pydantic row)")
    for name, decode_manifest, decode_status in rows:
        m = per_second(decode_manifest, manifest, args.repeat)
        s = per_second(decode_status, status, args.repeat * 4)
        print(f"{name:<28} {m:>12,.0f} {s:>12,.0f}")

    print("\nerrors for bad manifests:")
    for what, data in bad_documents(manifest).items():
        try:
            Manifest.from_json(data, source="jobs/clip-2024/manifests/w0.json")
        except DocumentError as exc:
            print(f"  {what}:\n    {exc}")
        else:
            print(f"  {what}:\n    (accepted!)")


if __name__ == "__main__":
    main()
