"""Hosts of their own on this machine, for tests and benchmarks: network namespaces on a bridge.

:class:`HostNetwork` makes a Linux bridge in the root network namespace (the coordinator's side,
address ``10.213.N.1/24``) and ``count`` hosts, each a network namespace joined to the bridge by a
veth pair, with its own address (``10.213.N.11``, ``.12``, ...). :meth:`HostNetwork.start_worker`
starts ``python -m worker`` on a host, in a mount namespace of its own where the shared root is
bind-mounted at a path of that host's (``<run dir>/host-I/shared``) and the coordinator's path of
it is covered by an empty tmpfs, so a path that only the coordinator's side can resolve fails
there as it would on another machine. The worker binds its host's address and wants a token.

Every name carries this process's id and a letter (``esrfb<pid><x>`` the bridge, ``esrfv<pid><x><i>``
the veths, ``esrf-<pid><x>-h<i>`` the namespaces), so parallel runs never collide, and
:func:`remove_stale` removes what a crashed run left (only where that run's process is gone).
The third octet is one no interface of this machine uses. Traffic goes only between the bridge's
address and the hosts'. :meth:`HostNetwork.close` kills the workers and every process left in the
namespaces, deletes the namespaces (their veth pairs go with them) and the bridge; the bind mounts
live only in the workers' mount namespaces and go with them.

Needs root and iproute2 (``ip``), util-linux (``unshare``, ``nsenter``, ``mount``):
:func:`unavailable` says why not, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.errors import WorkerStartError
from coordinator.local_workers import wait_listening
from media.ffmpeg import die_with_parent
from tests.workerutil import POLL_S, REPO, START_TIMEOUT_S, WorkerProcess

PREFIX = "esrf"
SUBNET = "10.213"
TOOLS = ("ip", "unshare", "nsenter", "mount")
COMMAND_TIMEOUT_S = 30.0
#: ``esrfb123a``, ``esrfv123a1``, ``esrf-123a-h1``: the owning process id is the number.
NAME = re.compile(rf"^{PREFIX}[-bvp](\d+)([a-z])")

_letters = itertools.cycle("abcdefghijklmnopqrstuvwxyz")


#: Capability bits (linux/capability.h) that making namespaces, links and mounts needs.
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def effective_capabilities() -> int:
    """This process's effective capability set (``CapEff`` of /proc/self/status); 0 if unknown."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return int(found.group(1), 16) if found else 0


def unavailable(
    euid: int | None = None,
    capabilities: int | None = None,
    which: Callable[[str], str | None] = shutil.which,
    platform: str = sys.platform,
) -> str | None:
    """Why hosts cannot be made here (not Linux, not root, a root without the capabilities, as in an
    unprivileged container, a tool missing), or None if they can. ``euid`` and ``capabilities`` are
    this process's unless given."""
    if platform != "linux":
        return "network namespaces need Linux"
    if (os.geteuid() if euid is None else euid) != 0:
        return "making network namespaces needs root (CI runs as root)"
    caps = effective_capabilities() if capabilities is None else capabilities
    lacking = [
        name
        for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
        if not caps >> bit & 1
    ]
    if lacking:
        return f"root here lacks {' and '.join(lacking)} (an unprivileged container?)"
    missing = [tool for tool in TOOLS if which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install iproute2 util-linux mount)"
    return None


def sh(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command (``ip``, ``mount``...), bounded; raise with its stderr if it fails and ``check``."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def links() -> list[str]:
    """Names of the root namespace's interfaces (``veth@peer`` without the peer)."""
    names = []
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def ours(names: Sequence[str], pid: int | None = None) -> list[str]:
    """The names among ``names`` made by this harness (by process ``pid``, if given)."""
    found = []
    for name in names:
        match = NAME.match(name)
        if match and (pid is None or int(match.group(1)) == pid):
            found.append(name)
    return found


def leftovers(tag: str) -> list[str]:
    """Namespaces and interfaces of the network ``tag`` that still exist (none after close())."""
    found = []
    for name in [*namespaces(), *links()]:
        match = NAME.match(name)
        if match and match.group(1) + match.group(2) == tag:
            found.append(name)
    return found


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process left in ``namespace`` (all of them were started in it by this harness)."""
    result = sh("ip", "netns", "pids", namespace, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    sh("ip", "netns", "del", namespace, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces and interfaces of earlier runs whose process is gone; returns their names."""
    removed = []
    for namespace in ours(namespaces()):
        match = NAME.match(namespace)
        if match and not _alive(int(match.group(1))):
            _delete_namespace(namespace)
            removed.append(namespace)
    for link in ours(links()):
        match = NAME.match(link)
        if match and not _alive(int(match.group(1))):
            sh("ip", "link", "del", link, check=False)
            removed.append(link)
    return removed


def _free_octet(start: int) -> int:
    """A third octet for ``10.213.N.0/24`` that no interface of this machine uses, from ``start`` on."""
    used = set(re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", sh("ip", "-o", "-4", "addr", "show").stdout))
    for octet in itertools.islice(itertools.cycle(range(1, 255)), start % 254, start % 254 + 254):
        if str(octet) not in used:
            return octet
    raise RuntimeError(f"every {SUBNET}.N.0/24 is in use on this machine")


@dataclass(frozen=True)
class Host:
    """One host: its network namespace, address, the root side of its veth pair, and where it
    mounts the shared root."""

    index: int
    namespace: str
    address: str
    veth: str
    mountpoint: Path


@dataclass
class HostWorker(WorkerProcess):
    """A worker running on a host (``WorkerProcess``'s ``url`` is its host's address)."""

    host: Host | None = None
    port_file: Path | None = None


@dataclass
class HostNetwork:
    """A bridge and ``count`` hosts on it; see the module docstring. Use ``with`` (or close())."""

    run_dir: Path
    count: int = 3
    tag: str = field(default_factory=lambda: f"{os.getpid()}{next(_letters)}")
    hosts: list[Host] = field(default_factory=list)
    workers: list[HostWorker] = field(default_factory=list)
    bridge: str = ""
    gateway: str = ""

    def __enter__(self) -> HostNetwork:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        if not 1 <= self.count <= 9:
            raise ValueError(f"1 to 9 hosts, not {self.count}")
        remove_stale()
        octet = _free_octet(os.getpid())
        self.bridge = f"{PREFIX}b{self.tag}"
        self.gateway = f"{SUBNET}.{octet}.1"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for index in range(1, self.count + 1):
            namespace = f"{PREFIX}-{self.tag}-h{index}"
            veth, peer = f"{PREFIX}v{self.tag}{index}", f"{PREFIX}p{self.tag}{index}"
            mountpoint = self.run_dir / f"host-{index}" / "shared"
            mountpoint.mkdir(parents=True, exist_ok=True)
            host = Host(index, namespace, f"{SUBNET}.{octet}.{10 + index}", veth, mountpoint)
            sh("ip", "netns", "add", namespace)
            self.hosts.append(host)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", namespace)
            sh("ip", "-n", namespace, "link", "set", peer, "name", "eth0")
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            sh("ip", "-n", namespace, "link", "set", "eth0", "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")

    def start_workers(
        self, shared_root: Path, model: Path | str, token_file: Path, *, args: Sequence[str] = ()
    ) -> list[HostWorker]:
        """A worker on every host (:meth:`spawn_worker`), all started at once, each waited for."""
        started = [self.spawn_worker(host, shared_root, model, token_file, args=args) for host in self.hosts]
        for worker in started:
            self.wait_ready(worker)
        return started

    def start_worker(
        self, host: Host, shared_root: Path, model: Path | str, token_file: Path, *, args: Sequence[str] = ()
    ) -> HostWorker:
        """``python -m worker`` on ``host`` (see :meth:`spawn_worker`), once it is healthy."""
        return self.wait_ready(self.spawn_worker(host, shared_root, model, token_file, args=args))

    def spawn_worker(
        self, host: Host, shared_root: Path, model: Path | str, token_file: Path, *, args: Sequence[str] = ()
    ) -> HostWorker:
        """Start ``python -m worker`` on ``host``: bound to its address (port 0) with ``token_file``, the
        shared root ``shared_root`` bind-mounted at ``host.mountpoint`` (its ``--shared-root``) and
        hidden at its own path. It dies with the calling thread (start it from one that outlives it)."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        port_file = logs / f"worker-h{host.index}-{time.monotonic_ns()}.json"
        log_path = port_file.with_suffix(".log")
        worker_args = [
            "--shared-root", str(host.mountpoint), "--host", host.address, "--port", "0",
            "--token-file", str(token_file), "--model", str(model), "--worker-id", f"host-{host.index}",
            "--port-file", str(port_file), *args,
        ]  # fmt: skip
        # ip netns exec and unshare exec (no fork), and so does the shell: the Popen's pid is the worker's.
        script = (
            'mount --bind "$1" "$2" && mount -t tmpfs -o size=64k esrf-elsewhere "$1" && shift 2 && exec "$@"'
        )
        argv = [
            "ip", "netns", "exec", host.namespace, "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", script, "sh", str(shared_root), str(host.mountpoint),
            sys.executable, "-m", "worker", *worker_args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                cwd=REPO, preexec_fn=die_with_parent,
            )  # fmt: skip
        worker = HostWorker(process, "", log_path, token_file.read_text().strip(), host, port_file)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: HostWorker) -> HostWorker:
        """Wait until ``worker`` listens and answers /health with 200; raise with its log if it does not."""
        assert worker.port_file is not None and worker.host is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            worker.url = wait_listening(
                worker.process, worker.port_file, worker.log_path, timeout_s=START_TIMEOUT_S, poll_s=POLL_S
            )
        except WorkerStartError as exc:
            raise AssertionError(f"{exc}:\n{worker.log()}") from None
        while worker.get("/health").status != 200:
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"worker on host {worker.host.index} never became healthy:\n{worker.log()}"
                )
            time.sleep(POLL_S)
        return worker

    def cut(self, host: Host) -> None:
        """Cut ``host``'s link: its bridge port goes down (the host keeps its address, unreachable)."""
        sh("ip", "link", "set", host.veth, "down")

    def lose_storage(self, worker: HostWorker) -> None:
        """``worker``'s host loses the shared root with its link, as with network storage: its mount
        turns read-only in the worker's mount namespace."""
        assert worker.host is not None
        sh("nsenter", "-t", str(worker.pid), "-m", "mount", "-o", "remount,bind,ro", worker.host.mountpoint)

    def close(self) -> None:
        """Stop the workers, then delete the namespaces and the bridge; what is left is an error."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=30)
        for host in self.hosts:
            sh("ip", "link", "del", host.veth, check=False)  # both ends at once, unlike the namespace's end
            _delete_namespace(host.namespace)
        if self.bridge:
            sh("ip", "link", "del", self.bridge, check=False)
        self.hosts.clear()
        left = leftovers(self.tag)
        if left:
            raise RuntimeError(f"the host network {self.tag} left {', '.join(left)} behind")
