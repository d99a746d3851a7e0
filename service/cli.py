"""``esrfarm serve`` (the job service) and its clients: ``esrfarm submit``, ``jobs``, ``show``,
``cancel``, ``retry``. ``esrfarm`` runs them as ``python -m service <command> ...`` (the coordinator
never imports this package)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from coordinator.cli import BAR_COUNTED, BAR_UNCOUNTED, FLAGS, farm_settings_from_args
from coordinator.errors import SpecError
from coordinator.spec import DEFAULT_MODEL
from manifests.chunks import parse_size
from manifests.dedup import DEDUP_LEVELS
from manifests.manifest import BACKENDS
from manifests.tokens import TokenError, read_token
from service.errors import ClientError, ListenError, SettingsError, StoreError
from service.settings import DEFAULT_MAX_UPLOAD, DEFAULT_PORT, ServiceSettings
from service.store import DEFAULT_LOCK_TIMEOUT_S

SERVICE_ENV = "ESRFARM_SERVICE"
DEFAULT_SERVICE = f"http://127.0.0.1:{DEFAULT_PORT}"
TERMINAL_STATES = {"done", "failed", "cancelled"}
EXIT_DATABASE = 3  # the database cannot be used (systemd does not restart it: RestartPreventExitStatus)

log = logging.getLogger("esrfarm.service")


# -- esrfarm serve -----------------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esrfarm serve",
        description=(
            "Run the job service: a persistent queue of upscaling jobs (SQLite under the shared root), "
            "run on the farm's workers by the coordinator's job engine, with a JSON API, live events "
            "(SSE) and a web page at /. It owns the workers while it runs. Jobs left running by a "
            "stopped service resume when it starts again."
        ),
    )
    parser.add_argument("--shared-root", type=Path, required=True, help="directory shared with the workers")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", help="comma-separated URLs of workers already running")
    where.add_argument(
        "--local-workers", type=int, metavar="N", help="start N local workers (default: one per GPU)"
    )
    where.add_argument(
        "--ray", metavar="auto|ADDRESS",
        help="run the workers as actors on a Ray cluster (auto: the one this host belongs to; or host:port); "
        "every node mounts the shared root at the same path and has esrfarm with the [ray] extra",
    )  # fmt: skip
    parser.add_argument(
        "--ray-workers", type=int, metavar="N",
        help="how many worker actors with --ray (default: one per GPU of the cluster; on a CPU-only "
        "cluster one per esrfarm_worker resource, else 1)",
    )  # fmt: skip
    parser.add_argument(
        "--worker-arg", action="append", default=[], metavar="ARG",
        help="extra flag for local workers, repeatable (e.g. --worker-arg=--device=cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--worker-token-file", type=Path, help="the workers' bearer token (or ESRFARM_WORKER_TOKEN)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0: any)")
    parser.add_argument(
        "--token-file", type=Path,
        help="file holding the bearer token every /api request must send; required off loopback",
    )  # fmt: skip
    parser.add_argument(
        "--input-root", type=Path, action="append", default=[], metavar="DIR",
        help="a directory whose files may be submitted by path (repeatable; uploads are always allowed)",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, help="where outputs go (default <shared root>/outputs)")
    parser.add_argument("--db", type=Path, help="the SQLite database (default <shared root>/service/jobs.db)")
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, metavar="S",
        help="seconds a submit's body may take, and an upload may stall (no byte arriving), before "
        "it is dropped with 408 (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--db-lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT_S, metavar="S",
        help="seconds a database call waits for another process's lock on it (default %(default)s); "
        "past that the API answers 503, and running jobs go on (their end is stored once it can be)",
    )  # fmt: skip
    parser.add_argument(
        "--max-running", type=int, default=2, metavar="K",
        help="jobs run at once on the shared workers (default %(default)s; see benchmarks/RESULTS.md)",
    )  # fmt: skip
    parser.add_argument(
        "--max-upload", default=f"{DEFAULT_MAX_UPLOAD >> 30}G", metavar="SIZE",
        help="largest upload (default %(default)s); larger ones get 413",
    )  # fmt: skip
    parser.add_argument(
        "--unreachable-timeout", type=float, default=30.0, metavar="S",
        help="seconds a worker's /health may fail before its batches go elsewhere (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--stale-timeout", type=float, default=600.0, metavar="S",
        help="seconds a worker's status may stand still before its batches go elsewhere "
        "(default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-device", default="auto",
        help="device of comparison jobs (auto: first GPU, else CPU; cpu; cuda:N; default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-arg", action="append", default=[], metavar="ARG",
        help="extra flag for esrfarm compare in comparison jobs, repeatable "
        "(e.g. --compare-arg=--cpu-threads=2)",
    )  # fmt: skip
    parser.add_argument("--port-file", type=Path, help='write {"url", "pid"} here once listening')
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug")
    return parser


def serve_main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.api import serve
    from service.scheduler import SchedulerSettings

    try:
        token = read_token(args.token_file, {}) if args.token_file is not None else None
        settings = ServiceSettings(
            shared_root=args.shared_root, db=args.db, host=args.host, port=args.port, token=token,
            input_roots=tuple(args.input_root), output_dir=args.output_dir,
            max_upload_bytes=parse_size(args.max_upload), port_file=args.port_file,
            db_lock_timeout_s=args.db_lock_timeout, body_timeout_s=args.body_timeout,
        )  # fmt: skip
        farm = farm_settings_from_args(args, read_token(args.worker_token_file))
        scheduling = SchedulerSettings(
            max_running=args.max_running, compare_device=args.compare_device,
            compare_args=tuple(args.compare_arg),
        )  # fmt: skip
    except SpecError as exc:
        sys.stderr.write(f"esrfarm serve: error: {FLAGS.get(exc.field, exc.field)} {exc.problem}\n")
        return 2
    except (SettingsError, TokenError, ValueError) as exc:
        sys.stderr.write(f"esrfarm serve: error: {exc}\n")
        return 2

    def announce(line: str) -> None:
        sys.stderr.write(f"esrfarm serve: {line}\n")
        sys.stderr.flush()

    try:
        asyncio.run(serve(settings, farm, scheduling, announce))
    except StoreError as exc:  # restarting would meet the same database: see README, troubleshooting
        sys.stderr.write(f"esrfarm serve: error: {exc}\n")
        return EXIT_DATABASE
    except ListenError as exc:
        sys.stderr.write(f"esrfarm serve: error: {exc}\n")
        return 1
    return 0


# -- the clients -------------------------------------------------------------------------------------


class Client:
    """The service's API over HTTP (stdlib only: the clients start fast)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in {**self._auth(), **(headers or {})}.items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ClientError(_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the service at {self.url}: {reason}") from None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/api/jobs", body)
        return result

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?{urllib.parse.urlencode({'state': state})}" if state else ""
        result: list[dict[str, Any]] = self._request("GET", f"/api/jobs{query}")
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/api/jobs/{urllib.parse.quote(job_id)}")
        return result

    def action(self, job_id: str, action: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/api/jobs/{urllib.parse.quote(job_id)}/{action}", {})
        return result

    def events(self, since: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """The service's SSE stream from event ``since`` on: (event id, job JSON), reconnecting."""
        last = since
        while True:
            request = urllib.request.Request(f"{self.url}/api/events", headers={**self._auth()})
            request.add_header("Last-Event-ID", str(last))
            try:
                with urllib.request.urlopen(request, timeout=60) as stream:
                    for event_id, data in _parse_sse(stream):
                        last = event_id
                        yield event_id, data
            except urllib.error.HTTPError as exc:
                raise ClientError(_message(exc)) from None
            except (urllib.error.URLError, OSError) as exc:
                log.warning("event stream broke (%s); reconnecting", exc)


def _parse_sse(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    event_id: int | None = None
    data: list[str] = []
    for raw in stream:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if event_id is not None and data:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return f"{exc.code}: {json.loads(exc.read())['error']}"
    except (ValueError, KeyError, TypeError):
        return f"{exc.code}: {exc.reason}"


def client_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--service", default=os.environ.get(SERVICE_ENV, DEFAULT_SERVICE),
        help=f"the service's URL (env {SERVICE_ENV}; default {DEFAULT_SERVICE})",
    )  # fmt: skip
    common.add_argument("--token-file", type=Path, help="file holding the service's bearer token")
    parser = argparse.ArgumentParser(prog="esrfarm", description="Talk to a running esrfarm service.")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser(
        "submit", parents=[common], prog="esrfarm submit",
        help="queue one job per input x model x scale (one batch)",
        description="Queue one job per INPUT x model x scale (one batch) and print the job ids. Paths "
        "must be under one of the service's --input-root directories. With --compare, one comparison "
        "job per INPUT x scale over all the models (esrfarm compare's report), and the batch's "
        "comparison page.",
    )  # fmt: skip
    submit.add_argument("inputs", nargs="+", help="videos (absolute paths, as the service sees them)")
    submit.add_argument(
        "--model", help=f"model name(s), comma-separated (default {DEFAULT_MODEL}; with --compare, "
        "every catalog model available offline plus bicubic and lanczos)",
    )  # fmt: skip
    submit.add_argument(
        "--compare", action="store_true",
        help="compare the models instead of upscaling: quality, flicker and speed on each input, one "
        "report per input and one comparison page for the batch (see esrfarm compare --help)",
    )  # fmt: skip
    submit.add_argument("--frames", type=int, help="with --compare: contiguous frames compared (default 12)")
    submit.add_argument("--scale", help="scale(s), comma-separated (default: the model's own)")
    submit.add_argument(
        "--backend", choices=BACKENDS,
        help="the workers' backend for these jobs: torch (default) or ncnn (Vulkan), as for esrfarm upscale",
    )  # fmt: skip
    submit.add_argument("--codec", help="libx264 (default), libx265, libsvtav1, ffv1, ...")
    submit.add_argument("--crf", type=int, help="quality (default: per codec)")
    submit.add_argument("--preset", help="encoder preset (default: per codec)")
    submit.add_argument(
        "--dedup",
        action="store_true",
        help="upscale a held frame once, as esrfarm upscale --dedup (videos only); with --compare, "
        "the report also shows what --dedup does to the run, as esrfarm compare --dedup",
    )
    submit.add_argument(
        "--dedup-level",
        choices=list(DEDUP_LEVELS),
        help="with --dedup: how close a repeat must be, as esrfarm upscale --dedup-level (default strict)",
    )
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--output-dir", help="under the service's output directory")
    submit.add_argument(
        "--wait", action="store_true", help="show progress until every job ends; exit 1 if any failed"
    )
    jobs = sub.add_parser("jobs", parents=[common], prog="esrfarm jobs", help="list the service's jobs")
    jobs.add_argument("--state", choices=["queued", "running", "done", "failed", "cancelled"])
    for name, text in (("show", "one job, as JSON"), ("cancel", "cancel a job"), ("retry", "queue it again")):
        one = sub.add_parser(name, parents=[common], prog=f"esrfarm {name}", help=text)
        one.add_argument("id", help="the job id, or any unique start of it (the 8 characters the page shows)")
    return parser


def client_main(argv: list[str]) -> int:
    args = client_parser().parse_args(argv)
    try:
        client = Client(args.service, read_token(args.token_file, {}) if args.token_file else None)
        if args.command == "submit":
            return _submit(client, args)
        if args.command == "jobs":
            jobs = client.jobs(args.state)
            if not jobs:
                sys.stderr.write(f"no {args.state + ' ' if args.state else ''}jobs\n")
            else:
                print(JOB_HEADER)
            for job in jobs:
                print(_job_line(job))
            return 0
        if args.command == "show":
            print(json.dumps(client.job(args.id), indent=2))
            return 0
        job = client.action(args.id, args.command)
        done = "cancelled" if args.command == "cancel" else "queued again (it resumes)"
        print(f"job {job['id']} {done}: {job['input']}")
        return 0
    except (ClientError, TokenError) as exc:
        sys.stderr.write(f"esrfarm {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _submit(client: Client, args: argparse.Namespace) -> int:
    inputs = [str(Path(p).absolute()) for p in args.inputs]
    body: dict[str, Any] = {"inputs": inputs, "priority": args.priority}
    models = [m for m in (args.model or ("" if args.compare else DEFAULT_MODEL)).split(",") if m]
    if models:
        body["models"] = models
    if args.compare:
        body["type"] = "compare"
        for name in ("codec", "crf", "preset", "backend"):
            if getattr(args, name) is not None:
                raise ClientError(f"--{name} is for upscaling jobs; a comparison writes a report")
        if args.frames is not None:
            body["frames"] = args.frames
    elif args.frames is not None:
        raise ClientError("--frames is for --compare")
    if args.scale:
        try:
            body["scales"] = [float(s) for s in args.scale.split(",") if s]
        except ValueError:
            raise ClientError(f"--scale takes numbers, not {args.scale!r}") from None
    for name in ("codec", "crf", "preset", "output_dir", "backend"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.dedup:
        body["dedup"] = True
    if args.dedup_level is not None:
        body["dedup_level"] = args.dedup_level
    since = _last_event_id(client) if args.wait else 0
    batch = client.submit(body)
    for job in batch["jobs"]:
        print(job["id"])
    sys.stdout.flush()
    if batch.get("batch_url"):
        sys.stderr.write(f"comparison page: {client.url}{batch['batch_url']}\n")
    if not args.wait:
        return 0
    return _wait(client, batch["jobs"], since)


def _last_event_id(client: Client) -> int:
    """The newest stored event id now: --wait follows the stream from there, missing nothing."""
    health: dict[str, Any] = client._request("GET", "/healthz")
    return int(health.get("last_event_id", 0))


def _wait(client: Client, jobs: list[dict[str, Any]], since: int) -> int:
    from tqdm import tqdm

    state = {job["id"]: job for job in jobs}
    bars = {
        job["id"]: tqdm(
            total=None,
            desc=f"{job['id'][:8]} queued",
            unit="frame",
            position=i,
            leave=True,
            bar_format=BAR_UNCOUNTED,
        )
        for i, job in enumerate(jobs)
    }
    for job in jobs:  # jobs may have ended before the stream starts
        state[job["id"]] = client.job(job["id"])
    try:
        pending = {j for j, job in state.items() if job["state"] not in TERMINAL_STATES}
        stream = client.events(since) if pending else iter(())
        for _, job in stream:
            if job["id"] not in state:
                continue
            state[job["id"]] = job
            bar = bars[job["id"]]
            bar.total = job["frames_total"] or None
            bar.bar_format = BAR_COUNTED if bar.total else BAR_UNCOUNTED  # no empty bar, no "0frame"
            bar.n = job["frames_done"]
            bar.set_description(f"{job['id'][:8]} {job['stage'] or job['state']}", refresh=False)
            bar.set_postfix_str(f"{job['fps']:.2f} fps" if job.get("fps") else "", refresh=False)
            bar.refresh()
            if job["state"] in TERMINAL_STATES:
                pending.discard(job["id"])
            if not pending:
                break
    finally:
        for bar in bars.values():
            bar.close()
    failed = 0
    for job in state.values():
        print(_job_line(job))
        failed += job["state"] != "done"
    return 1 if failed else 0


def _job_line(job: dict[str, Any]) -> str:
    progress = f"{job['frames_done']}/{job['frames_total']}" if job["frames_total"] else "-"
    detail = job["error"] or job["output"]
    stage = job["stage"] or ""
    return _columns(job["id"], job["state"], stage, progress, job["model"], detail)


def _columns(job_id: str, state: str, stage: str, progress: str, model: str, detail: str) -> str:
    return f"{job_id:16s}  {state:9s} {stage:13s} {progress:>11s}  {model}  {detail}"


#: The header line of ``esrfarm jobs`` (``--wait``'s summary has none: one line per job submitted).
JOB_HEADER = _columns("ID", "STATE", "STAGE", "FRAMES", "MODEL", "OUTPUT OR ERROR")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        return serve_main(args[1:])
    return client_main(args)
