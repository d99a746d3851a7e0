"""The HTTP guard (manifests/httpguard.py, installed by worker/httpguard.py), checked once as a table
of requests against both servers that use it: a real worker process and a real job service process,
each without a token and with one, all on 127.0.0.1. Every row expects the same status from both.

Each server lends the table three paths: ``read`` (a guarded GET: 200), ``change`` (a guarded POST
that reads a JSON body; ``{}`` is a body its route refuses with 400, so 400 means "the guard let it
through") and ``public`` (outside the guard: 200 whatever the headers)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serviceutil import start_service
from tests.workerutil import WorkerProcess, start_worker

TOKEN = "s3cret-guard"
LARGE = 2 << 20  # over both servers' JSON body limits (the worker's 64 KiB, the service's 1 MiB)
REFUSALS = {  # what each of the guard's refusals says
    401: "missing or wrong bearer token",
    408: "the request body did not arrive within 2s (--body-timeout)",
    413: "the request body is too large: at most ",
    415: "takes Content-Type: application/json, not ",
}
STALL = ["--body-timeout", "2"]  # a stalled body is answered 408 after this many seconds
ROUTE = 400  # the change route's own answer to {}: the guard let the request through

PATHS = {
    "worker": {"read": "/status", "change": "/process_manifest", "public": "/health"},
    "service": {"read": "/api/jobs", "change": "/api/jobs", "public": "/healthz"},
}


@dataclass(frozen=True)
class Row:
    name: str
    status: int
    path: str = "read"  # read | change | public
    token: str | None = None  # the server's token: None (no token), or what the request sends
    host: str = "127.0.0.1:{port}"
    origin: str | None = None
    content_type: str | None = "application/json"
    length: int | None = None  # a body of this many bytes instead of {}
    chunked: bool = False
    stalls: bool = False  # half the body is sent, then nothing more
    says: str = ""  # a 403's reason, {server} the server's name


JSON = "application/json"
FOREIGN_HOST = "is not this {server}'s: without a token it answers only to a loopback name"
CROSS_SITE = "refused (cross-site)"
# Rows with ``token`` set run against the servers started with a token; "" sends no Authorization.
TABLE = [
    Row("loopback address", 200),
    Row("localhost", 200, host="localhost:{port}"),
    Row("LOCALHOST, no port", 200, host="LOCALHOST"),
    Row("IPv6 loopback", 200, host="[::1]:{port}"),
    Row("a name under .localhost", 200, host="app.localhost:{port}"),
    Row("127.0.0.2", 200, host="127.0.0.2:{port}"),
    Row("localhost. (trailing dot)", 403, host="localhost.:{port}", says=FOREIGN_HOST),
    Row("localhost.localdomain", 403, host="localhost.localdomain:{port}", says=FOREIGN_HOST),
    Row("a foreign name", 403, host="evil.example:{port}", says=FOREIGN_HOST),
    Row("a foreign name, POST", 403, path="change", host="evil.example:{port}", says=FOREIGN_HOST),
    Row("a foreign address", 403, host="10.1.2.3:{port}", says=FOREIGN_HOST),
    Row("no Host (HTTP/1.0)", 403, host="", says=FOREIGN_HOST),
    Row("a foreign name, public path", 200, path="public", host="evil.example"),
    Row("POST, own Host", ROUTE, path="change"),
    Row("POST, own Origin", ROUTE, path="change", origin="http://127.0.0.1:{port}"),
    Row("POST, foreign Origin", 403, path="change", origin="http://evil.example", says=CROSS_SITE),
    Row("POST, Origin null", 403, path="change", origin="null", says=CROSS_SITE),
    Row("GET, foreign Origin", 200, origin="http://evil.example"),
    Row("POST, text/plain", 415, path="change", content_type="text/plain"),
    Row("POST, a form", 415, path="change", content_type="application/x-www-form-urlencoded"),
    Row("POST, no content type", 415, path="change", content_type=None),
    Row("POST, JSON with charset", ROUTE, path="change", content_type=f"{JSON}; charset=utf-8"),
    Row("POST, body over the limit (declared)", 413, path="change", length=LARGE),
    Row("POST, body over the limit (chunked)", 413, path="change", length=LARGE, chunked=True),
    Row("POST, a body that stalls", 408, path="change", stalls=True),
    Row("no token", 401, token=""),
    Row("a wrong token", 401, token="Bearer nope"),
    Row("the token without Bearer", 401, token=TOKEN),
    Row("the token", 200, token=f"Bearer {TOKEN}"),
    Row("the token, foreign Host", 200, token=f"Bearer {TOKEN}", host="evil.example:{port}"),
    Row("the token, public path, none sent", 200, path="public", token=""),
    Row("the token, POST", ROUTE, path="change", token=f"Bearer {TOKEN}"),
    Row("the token, foreign Origin", 403, "change", f"Bearer {TOKEN}", origin="null", says=CROSS_SITE),
    Row("the token, text/plain", 415, path="change", token=f"Bearer {TOKEN}", content_type="text/plain"),
    Row("no token, text/plain", 401, path="change", token="", content_type="text/plain"),
]


def send(
    url: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes, chunked: bool, stalls: bool
) -> tuple[int, dict[str, str], bytes]:
    """Send a request exactly as given (its own Host header or none) on a new connection; the
    answer's status, headers (lower-case names) and body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    version = "1.1" if any(k == "Host" for k, _ in headers) else "1.0"  # 1.1 requires a Host
    head = [f"{method} {path} HTTP/{version}", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        step = 64 * 1024
        payload = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step]) for i in range(0, len(body), step)
        )
        payload += b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body[: len(body) // 2] if stalls else body
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before the whole body
            sock.sendall(payload)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    head_bytes, _, body_bytes = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body_bytes


@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, bool], str]]:
    """(server, has a token) -> URL: a worker and a service, each without and with a token."""
    root = tmp_path_factory.mktemp("guard-root")
    logs = tmp_path_factory.mktemp("guard-logs")
    token_file = logs / "token"
    token_file.write_text(TOKEN + "\n")
    processes: list[WorkerProcess] = []
    try:
        open_worker = start_worker(root, tiny_model, logs, args=STALL)
        processes.append(open_worker)
        token_worker = start_worker(
            root, tiny_model, logs, args=STALL, env={"ESRFARM_WORKER_TOKEN": TOKEN}, token=TOKEN
        )
        processes.append(token_worker)
        open_service = start_service(
            root, logs, [*STALL, "--workers", open_worker.url, "--db", logs / "open.db"]
        )
        processes.append(open_service)
        token_service = start_service(
            root, logs,
            ["--workers", token_worker.url, "--worker-token-file", token_file, "--token-file", token_file,
             "--db", logs / "token.db", *STALL],
        )  # fmt: skip
        processes.append(token_service)
        yield {
            ("worker", False): open_worker.url,
            ("worker", True): token_worker.url,
            ("service", False): open_service.url,
            ("service", True): token_service.url,
        }
    finally:
        for process in reversed(processes):
            process.stop()


@pytest.mark.parametrize("server", ["worker", "service"])
@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
def test_the_guard_answers_both_servers_alike(
    servers: dict[tuple[str, bool], str], server: str, row: Row
) -> None:
    url = servers[(server, row.token is not None)]
    port = url.rsplit(":", 1)[1]
    headers: list[tuple[str, str]] = []
    if row.host:
        headers.append(("Host", row.host.format(port=port)))
    if row.token:
        headers.append(("Authorization", row.token))
    if row.origin is not None:
        headers.append(("Origin", row.origin.format(port=port)))
    method = "POST" if row.path == "change" else "GET"
    body = b""
    if method == "POST":
        body = b"{}" if row.length is None else b" " * row.length
        if row.content_type is not None:
            headers.append(("Content-Type", row.content_type))
    status, answer_headers, answer = send(
        url, method, PATHS[server][row.path], headers, body, row.chunked, row.stalls
    )
    assert status == row.status, (server, row, answer)
    if status in REFUSALS:  # the guard's answer, the same from both: JSON naming the problem
        assert answer_headers["content-type"].startswith(JSON), answer_headers
        says = REFUSALS.get(status) or row.says.format(server=server)
        assert says and says in json.loads(answer)["error"], answer
    if status == 401:
        assert answer_headers["www-authenticate"] == 'Bearer realm="esrfarm"'
