"""The fleet's workers as Ray actors: Ray places and restarts them; each runs the ordinary worker.

``esrfarm upscale --ray auto|ADDRESS`` asks a Ray cluster for N :class:`WorkerActor` actors. An
actor's ``__init__`` starts the same ``python -m worker`` process that systemd or a local pool runs
(:func:`coordinator.local_workers.spawn_worker`), on a free port of its node, and reports its URL.
The coordinator then talks to it over HTTP like to any remote worker (:class:`RayWorkerPool` is the
:class:`coordinator.fleet.WorkerFleet`'s pool): manifests are paths on the shared root, so no frame
ever goes through Ray's object store.

- **placement**: one GPU per actor (``num_gpus=1``) on a cluster with GPUs. On a CPU-only cluster,
  one CPU, plus one unit of the custom resource ``esrfarm_worker`` where the cluster defines it
  (``ray start --resources '{"esrfarm_worker": 2}'`` lets a node take two CPU workers).
- **restarts**: an actor that dies (its process, its worker process, its node) is restarted by Ray
  (``max_restarts``) wherever there is room; its worker comes back on a new URL.
  :meth:`RayWorkerPool.exited` names the old URL (the fleet loses it and its batches go to the
  others), :meth:`RayWorkerPool.joined` the new one (the fleet adds it), and
  :meth:`RayWorkerPool.replacing` the actors that are being restarted meanwhile (the job waits for
  them instead of failing for want of workers), for at most ``startup_timeout_s`` each.
- **the coordinator's death**: the actors belong to the coordinator's Ray job, so Ray destroys them
  when it exits, even by SIGKILL, and their workers die with them (``PR_SET_PDEATHSIG``). They are
  named ``esrfarm-<host>-<pid>-<slot>`` in the namespace ``esrfarm``; a later coordinator on the same
  host also kills any whose coordinator process is gone. The job itself resumes from the shared root.

This is the only module that imports ray; :mod:`coordinator.fleet` imports it only for ``--ray``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ray's crash handler (absl's failure signal handler, installed by ray.init) also takes SIGTERM: it
# logs a stack, passes the signal on, and arms a 3 s alarm that then aborts the process (SIGABRT). A
# coordinator or service stopping on SIGTERM waits for the batches in flight, often longer than
# that. Read when ray is imported, so set first (and always); a crash still ends the process, without
# Ray's trace.
os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from coordinator.errors import RayClusterError, WorkerStartError
from coordinator.local_workers import exit_reason, log_tail, spawn_worker, wait_listening
from manifests.tokens import TOKEN_ENV

log = logging.getLogger(__name__)

NAMESPACE = "esrfarm"
#: The custom resource that counts CPU worker slots on a CPU-only cluster.
CPU_SLOT_RESOURCE = "esrfarm_worker"
#: How often Ray restarts one actor before it is given up.
MAX_RESTARTS = 10


class WorkerActor:
    """One worker process on a Ray node (wrapped by :func:`ray.remote` in :meth:`RayWorkerPool.start`)."""

    def __init__(
        self,
        worker_args: Sequence[str],
        run_dir: str,
        name: str,
        token: str | None,
        host: str | None,
        startup_timeout_s: float,
    ) -> None:
        node_ip = ray.util.get_node_ip_address()
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.port_file = directory / f"{name}.port.json"
        self.log_file = directory / f"{name}.log"
        args = [*worker_args, "--host", host or node_ip, "--port", "0", "--worker-id", f"{name}@{node_ip}"]
        env = {**os.environ, TOKEN_ENV: token} if token else None
        self.process = self._spawn_in_thread(args, env)
        try:
            self._url = wait_listening(
                self.process, self.port_file, self.log_file, timeout_s=startup_timeout_s
            )
        except WorkerStartError:
            self.process.kill()
            raise

    def _spawn_in_thread(self, args: list[str], env: dict[str, str] | None) -> subprocess.Popen[bytes]:
        """Start the worker from a thread that lives exactly as long as it: the worker's death signal
        follows the thread that started it, and Ray runs ``__init__`` on a thread of its own."""
        started: list[subprocess.Popen[bytes] | BaseException] = []
        ready = threading.Event()

        def run() -> None:
            try:
                process = spawn_worker(args, port_file=self.port_file, log_file=self.log_file, env=env)
            except BaseException as exc:
                started.append(exc)
                ready.set()
                raise
            started.append(process)
            ready.set()
            process.wait()

        threading.Thread(target=run, name="esrfarm-worker", daemon=True).start()
        ready.wait()
        if isinstance(started[0], BaseException):
            raise started[0]
        return started[0]

    async def where(self) -> dict[str, Any]:
        """The worker's URL and pid, and the node it runs on."""
        context = ray.get_runtime_context()
        return {
            "url": self._url,
            "pid": self.process.pid,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }

    async def watch(self) -> str:
        """Returns, once the worker process has exited, why."""
        while self.process.poll() is None:
            await asyncio.sleep(0.2)
        return exit_reason("its worker process", self.process, self.log_file)

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the worker (it finishes its batch), SIGKILL it after ``timeout_s``; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()


@dataclass(eq=False)
class _Slot:
    """One actor, and what the pool knows of its worker's current URL."""

    name: str
    actor: Any
    url: str | None = None
    watch: Any = None  # ObjectRef of WorkerActor.watch on the current incarnation
    resolving: Any = None  # ObjectRef of WorkerActor.where while the pool waits for a (new) incarnation
    lost_at: float | None = None  # monotonic time its last worker was lost
    old_urls: set[str] = field(default_factory=set)
    gone: bool = False  # dead for good (killed, or out of restarts)


@dataclass
class RayWorkerPool:
    """The fleet's workers as Ray actors (see the module docstring)."""

    address: str  # "auto", or the cluster's address (host:port or ray://host:port)
    count: int | None  # None: one per GPU of the cluster, else one per esrfarm_worker slot, else 1
    worker_args: Sequence[str]  # --shared-root, --model, ...
    run_dir: Path  # worker logs and port files: on the shared root, seen at the same path by every node
    token: str | None
    startup_timeout_s: float = 600.0
    slots: list[_Slot] = field(default_factory=list)
    _exited: dict[str, str] = field(default_factory=dict)
    _connected: bool = False

    @property
    def run_name(self) -> str:
        return f"esrfarm-{socket.gethostname()}-{os.getpid()}"

    async def start(self) -> list[str]:
        """Connect, kill orphans of dead coordinators, create the actors and wait for their URLs.

        Actors Ray cannot place or start within ``startup_timeout_s`` join later if they ever do;
        raises :class:`WorkerStartError` if none is up by then.
        """
        await asyncio.to_thread(self._connect)
        self._kill_orphans()
        options, count, on_gpu = self._placement()
        actor_class = ray.remote(WorkerActor)
        device = [] if on_gpu else ["--device", "cpu"]
        host = "127.0.0.1" if self._cluster_is_this_host() else None
        for index in range(count):
            name = f"{self.run_name}-{index}"
            actor: Any = actor_class.options(name=name, namespace=NAMESPACE, **options).remote(
                [*self.worker_args, *device],
                str(self.run_dir),
                name,
                self.token,
                host,
                self.startup_timeout_s,
            )
            self.slots.append(_Slot(name, actor, resolving=actor.where.remote()))
        log.info(
            "asked Ray for %d worker actor(s) (%s)", count, ", ".join(f"{k}={v}" for k, v in options.items())
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout_s
        problems: dict[int, str] = {}
        while loop.time() < deadline and any(s.resolving is not None for s in self.slots):
            self._resolve(problems)
            if all(s.gone for s in self.slots):
                break
            await asyncio.sleep(0.1)
        urls = [s.url for s in self.slots if s.url is not None]
        if not urls:
            index, problem = next(
                iter(problems.items()), (0, f"Ray did not start it within {self.startup_timeout_s:g} s")
            )
            tail = log_tail(self.run_dir / f"{self.slots[index].name}.log")
            raise WorkerStartError(index, problem, tail, what="Ray worker actor")
        waiting = [s.name for s in self.slots if s.url is None and not s.gone]
        if waiting:
            log.warning(
                "%d Ray actor(s) not up yet, they join once Ray starts them: %s",
                len(waiting),
                ", ".join(waiting),
            )
        return urls

    def _connect(self) -> None:
        """``ray.init``, in a thread (start() runs it in one) so that Ray leaves the coordinator's own
        SIGTERM handling alone; its warning that it does is not shown."""
        if ray.is_initialized():
            return
        ray_log = logging.getLogger("ray._private.worker")
        level = ray_log.level
        ray_log.setLevel(logging.ERROR)
        try:
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayClusterError(self.address, _first_line(exc)) from exc
        finally:
            ray_log.setLevel(level)
        self._connected = True

    def _cluster_is_this_host(self) -> bool:
        """Every node runs on this host (a local cluster): workers bind 127.0.0.1."""
        here = ray.util.get_node_ip_address()
        return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n["Alive"])

    def _placement(self) -> tuple[dict[str, Any], int, bool]:
        """The actors' resource options, how many, and whether they run on GPUs."""
        total = ray.cluster_resources()
        common = {"max_restarts": MAX_RESTARTS, "max_task_retries": 0}
        if total.get("GPU", 0) >= 1:
            return {**common, "num_gpus": 1}, self.count or int(total["GPU"]), True
        slots = int(total.get(CPU_SLOT_RESOURCE, 0))
        if slots:
            return {**common, "num_cpus": 1, "resources": {CPU_SLOT_RESOURCE: 1}}, self.count or slots, False
        return {**common, "num_cpus": 1}, self.count or 1, False

    def _kill_orphans(self) -> None:
        """Kill this host's actors whose coordinator process is gone (Ray normally has already)."""
        prefix = f"esrfarm-{socket.gethostname()}-"
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = str(entry.get("name", ""))
            if entry.get("namespace") != NAMESPACE or not name.startswith(prefix):
                continue
            pid = name[len(prefix) :].split("-")[0]
            if not pid.isdigit() or _process_exists(int(pid)):
                continue
            log.warning("killing Ray actor %s: its coordinator (pid %s) is gone", name, pid)
            with contextlib.suppress(ValueError, RayActorError):
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)

    # -- what the fleet asks every health round ---------------------------------------------------

    def exited(self) -> dict[str, str]:
        """URL -> why, for every worker that exited or whose actor died (so far, all of them)."""
        gone = self._exited
        for slot in self.slots:
            if slot.watch is None or not ray.wait([slot.watch], timeout=0)[0]:
                continue
            assert slot.url is not None
            try:
                reason = str(ray.get(slot.watch))
                ray.kill(slot.actor, no_restart=False)  # the worker died, its actor did not: restart both
            except RayActorError as exc:
                reason = f"its Ray actor {slot.name} died ({_first_line(exc)})"
            gone[slot.url] = reason
            self._lost(slot)
        return dict(gone)

    def joined(self) -> list[str]:
        """URLs of workers that came up (a restarted actor's) since the last call."""
        return self._resolve({})

    def replacing(self) -> list[str]:
        """Names of actors being restarted for less than ``startup_timeout_s``: workers to wait for."""
        now = time.monotonic()
        return [
            s.name
            for s in self.slots
            if s.url is None
            and not s.gone
            and s.lost_at is not None
            and now - s.lost_at < self.startup_timeout_s
        ]

    def kill(self, url: str) -> None:
        """The fleet gave up on this worker (hung, stale): Ray restarts its actor, on a new URL."""
        for slot in self.slots:
            if slot.url == url:
                log.info("killing Ray actor %s (worker %s); Ray restarts it", slot.name, url)
                ray.kill(slot.actor, no_restart=False)
                self._lost(slot)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every worker that is up cleanly, then the actors; disconnect from Ray if this pool
        connected. An actor whose worker is not up (Ray has not placed or started it yet, or is
        restarting it) is only killed, and its worker process, if any, dies with it: a call on an
        actor still being created would hold the stop for the whole ``timeout_s``."""
        stops = [s.actor.stop.remote(timeout_s) for s in self.slots if not s.gone and s.url is not None]
        with contextlib.suppress(RayActorError, GetTimeoutError):
            await asyncio.to_thread(ray.get, stops, timeout=timeout_s + 5)
        for slot in self.slots:
            if not slot.gone and slot.url is None:
                log.info("Ray actor %s is not up: killed, not waited for", slot.name)
            with contextlib.suppress(RayActorError):
                ray.kill(slot.actor, no_restart=True)
            slot.gone = True
        if self._connected:
            await asyncio.to_thread(ray.shutdown)
            self._connected = False

    # -- inside -----------------------------------------------------------------------------------

    def _lost(self, slot: _Slot) -> None:
        if slot.url is not None:
            slot.old_urls.add(slot.url)
        slot.url, slot.watch, slot.lost_at = None, None, time.monotonic()
        slot.resolving = slot.actor.where.remote()

    def _resolve(self, problems: dict[int, str]) -> list[str]:
        """Take in the URLs of actors that answered; ask again those still restarting."""
        found = []
        for index, slot in enumerate(self.slots):
            if slot.resolving is None or not ray.wait([slot.resolving], timeout=0)[0]:
                continue
            try:
                where = ray.get(slot.resolving)
            except ActorUnavailableError:  # restarting: ask the next incarnation
                slot.resolving = slot.actor.where.remote()
                continue
            except RayActorError as exc:  # dead for good: its constructor failed, or out of restarts
                slot.resolving, slot.gone = None, True
                problems[index] = _first_line(exc)
                log.error("Ray actor %s is gone for good: %s", slot.name, _first_line(exc))
                continue
            url = str(where["url"])
            if url in slot.old_urls:  # the old incarnation answered before it was killed
                slot.resolving = slot.actor.where.remote()
                continue
            slot.url, slot.resolving, slot.lost_at = url, None, None
            slot.watch = slot.actor.watch.remote()
            log.info(
                "Ray actor %s on node %s (%s) serves at %s (pid %s)",
                slot.name, where["node_id"], where["node_ip"], url, where["pid"],
            )  # fmt: skip
            found.append(url)
        return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
