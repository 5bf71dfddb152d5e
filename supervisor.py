"""The process tree behind `bitnexus up`: OTP-style supervision of OS processes.

Each service replica is its own process (own event loop). The supervisor starts children in
order, restarts them by strategy within a restart intensity, and stops them in reverse order,
draining first. Children die with it (parent-death signal), so none outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker
import os
import signal
import sys
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

import msgspec

from bus.parent_death import die_with_parent, dies_with_this_process

if TYPE_CHECKING:
    from bus.embedded import EmbeddedNats
    from bus.runner import Serving

log = logging.getLogger("bitnexus.supervisor")

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
Restart = Literal["permanent", "transient", "temporary"]
State = Literal["starting", "running", "stopping", "stopped", "exited"]

SERVICES: dict[str, str] = {
    "ledger_events": "ledger.events:serving",
    "ledger": "ledger.service:serving",
    "accounts": "handlers.accounts:serving",
    "products": "handlers.products:serving",
    "transactions": "handlers.transactions:serving",
}
"""Service name -> "module:function" returning its serving context manager."""
TABLES_OF = {service: "ledger" if service == "ledger_events" else service for service in SERVICES}
"""Whose tables a service reads and writes: the ledger's relay publishes from the ledger's chain."""
SUPERVISOR = "supervisor"
"""The supervisor's name on NATS: its user and its inbox (`_MESH_INBOX.supervisor`), as a service's."""

nats_check_interval_s = 0.2
DEFAULT_CONFIG = Path("deploy/mesh.toml")


class ChildSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    replicas: int = 1
    restart: Restart = "permanent"
    shutdown_s: float = 10.0
    """Seconds to drain after SIGTERM before SIGKILL."""
    brutal_kill: bool = False
    """SIGKILL at once instead of SIGTERM and `shutdown_s`."""
    argv: tuple[str, ...] = ()
    """A command to run, e.g. a nested supervisor (`bitnexus supervise --config sub.toml`); empty
    means service `name` of this package, forked from the forkserver."""
    start_timeout_s: float = 30.0
    """Seconds to say it serves; past that it is killed and counts as a crash (OTP's start timeout)."""


class SupervisorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    strategy: Strategy = "one_for_one"
    restarts_max: int = 1
    """OTP's defaults: at most 1 restart in 5 seconds, past that the supervisor gives up."""
    restart_period_s: float = 5.0
    children: tuple[ChildSpec, ...] = ()


class NatsSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port: int = 4222


class MeshConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    supervisor: SupervisorSpec = SupervisorSpec()
    nats: NatsSpec = NatsSpec()


WHOLE_MESH = MeshConfig(supervisor=SupervisorSpec(restarts_max=3, children=tuple(ChildSpec(name) for name in SERVICES)))
"""What `up` starts with no mesh.toml (an installed `bitnexus` run outside this repository):
every service, one replica each, as `deploy/mesh.toml` says (a test holds the two equal)."""


class BadConfig(Exception):
    """A mesh.toml that is missing or is not the supervisor's config: said in one line."""


def load_config(path: Path) -> MeshConfig:
    try:
        return msgspec.convert(tomllib.loads(path.read_text()), MeshConfig)
    except FileNotFoundError:
        raise BadConfig(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise BadConfig(f"{path}: {exc}") from None


@dataclass
class Child:
    """One replica: a stable name (`accounts.2`) across restarts, a new process each time."""

    spec: ChildSpec
    name: str
    process: asyncio.subprocess.Process | ForkedProcess | None = None
    state: State = "stopped"
    restarts: int = 0
    started_at: str = ""
    ready: asyncio.Future[None] | None = None
    exited: asyncio.Task[int] | None = None


class Escalation(Exception):
    """Restart intensity exceeded: stop everything and exit non-zero, as an OTP supervisor does."""


@dataclass
class Supervisor:
    spec: SupervisorSpec
    children: list[Child] = field(default_factory=list)
    restart_times: deque[float] = field(default_factory=deque)
    started_at: str = ""

    def __post_init__(self) -> None:
        assert self.spec.restarts_max >= 0
        assert self.spec.restart_period_s > 0
        for child_spec in self.spec.children:
            assert child_spec.replicas >= 1
            for replica in range(1, child_spec.replicas + 1):
                self.children.append(Child(spec=child_spec, name=f"{child_spec.name}.{replica}"))

    async def run(self, stop: asyncio.Event, on_started: Callable[[], None] = lambda: None) -> None:
        """Start all, supervise until `stop`, then stop all in reverse order; `Escalation` past intensity."""
        from bus.codec import timestamp

        self.started_at = timestamp()
        try:
            for child in self.children:
                await self._start(child)
            on_started()
            await self._supervise(stop)
        finally:
            await self._stop_all(self.children)
            await asyncio.to_thread(stop_forkserver)

    async def _supervise(self, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                exits = {child.exited for child in self.children if child.exited and child.state != "stopping"}
                done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
                for child in self.children:
                    if child.exited in done and not stop.is_set():
                        await self._on_exit(child, child.exited.result())
        finally:
            stopping.cancel()

    async def _on_exit(self, child: Child, code: int) -> None:
        child.state = "exited"
        child.exited = None
        log.error("child terminated", extra={"context": "child_terminated", "offender": child.name, "reason": code})
        if not self._should_restart(child.spec, code):
            return
        self.count_restart()
        affected = self._affected_by(child)
        await self._stop_all([sibling for sibling in affected if sibling is not child])
        for sibling in affected:
            sibling.restarts += 1
            await self._start(sibling)

    @staticmethod
    def _should_restart(spec: ChildSpec, code: int) -> bool:
        return spec.restart == "permanent" or (spec.restart == "transient" and code != 0)

    def count_restart(self) -> None:
        """A restart against the intensity: `Escalation` past `restarts_max` in `restart_period_s`."""
        now = time.monotonic()
        self.restart_times.append(now)
        while self.restart_times and now - self.restart_times[0] > self.spec.restart_period_s:
            self.restart_times.popleft()
        if len(self.restart_times) > self.spec.restarts_max:
            log.error(
                "shutdown: reached max restart intensity",
                extra={
                    "context": "shutdown",
                    "restarts_max": self.spec.restarts_max,
                    "restart_period_s": self.spec.restart_period_s,
                },
            )
            raise Escalation(f"more than {self.spec.restarts_max} restarts in {self.spec.restart_period_s} s")

    def _affected_by(self, child: Child) -> list[Child]:
        """Which children restart with `child`, in start order."""
        if self.spec.strategy == "one_for_one":
            return [child]
        if self.spec.strategy == "one_for_all":
            return list(self.children)
        return self.children[self.children.index(child) :]

    async def _start(self, child: Child) -> None:
        from bus.codec import timestamp

        if child.spec.argv:
            child.process, read_fd = await _launch_command(child)
        else:
            child.process, read_fd = _launch_forked(child)
        child.state, child.started_at = "starting", timestamp()
        child.exited = asyncio.ensure_future(child.process.wait())
        log.info(
            "child started",
            extra={"context": "child_started", "offender": child.name, "offender_pid": child.process.pid},
        )
        try:
            await asyncio.wait_for(_read_ready(read_fd, child.exited), child.spec.start_timeout_s)
        except TimeoutError:  # hung (say, NATS unreachable): a crash, restarted within the intensity
            log.error(
                "child did not say it serves in time; killing",
                extra={"offender": child.name, "start_timeout_s": child.spec.start_timeout_s},
            )
            child.process.kill()
            await asyncio.shield(child.exited)
        finally:
            os.close(read_fd)
        if child.process.returncode is None:
            child.state = "running"

    async def _stop_all(self, children: list[Child]) -> None:
        for child in reversed(children):
            await self._stop(child)

    async def _stop(self, child: Child) -> None:
        """SIGTERM (the child drains), SIGKILL after `shutdown_s`; `brutal_kill` kills at once."""
        process = child.process
        if process is None or process.returncode is not None:
            child.state = "stopped" if child.state != "exited" else child.state
            return
        child.state = "stopping"
        if child.spec.brutal_kill:
            process.kill()
        else:
            process.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), child.spec.shutdown_s)
            except TimeoutError:
                log.warning("child did not stop in time; killing", extra={"offender": child.name})
                process.kill()
        await process.wait()
        child.state, child.exited = "stopped", None


async def _launch_command(child: Child) -> tuple[asyncio.subprocess.Process, int]:
    """Any command (a nested supervisor, a test child): it says ready on the fd in BITNEXUS_READY_FD."""
    from bus.runner import READY_FD_ENV

    read_fd, write_fd = os.pipe()
    env = {**os.environ, READY_FD_ENV: str(write_fd), "BITNEXUS_CHILD": child.name}
    try:
        process = await asyncio.create_subprocess_exec(
            *child.spec.argv,
            env=env,
            pass_fds=(write_fd,),
            preexec_fn=dies_with_this_process(),
            process_group=0,  # Ctrl-C reaches the supervisor alone; it drains children in order
        )
    finally:
        os.close(write_fd)
    return process, read_fd


class ForkedProcess:
    """A service replica forked from the forkserver (modules already imported), awaited like a subprocess."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    async def wait(self) -> int:
        if self._process.exitcode is None:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            loop.add_reader(self._process.sentinel, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(self._process.sentinel)
        self._process.join()
        code = self._process.exitcode
        assert code is not None
        return code


_forkserver = multiprocessing.get_context("forkserver")
FORKSERVER_PRELOAD = [
    "bus.forkserver_init",
    "supervisor",
    "bus.runner",
    "handlers.accounts",
    "handlers.products",
    "handlers.transactions",
    "ledger.service",
]


def stop_forkserver() -> None:
    """Stop and reap the forkserver and its resource tracker once every replica is stopped, so
    nothing outlives the supervisor.

    multiprocessing has no public way: `_stop()` (kept for its own tests) closes the alive pipe
    and waits; the SIGTERM first makes sure the forkserver's wait ends. The resource tracker,
    which the forkserver starts as the supervisor's child, ends once the last holder of its pipe
    closes it: left alone it would still be exiting after the supervisor is gone.
    """
    server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(server._forkserver_pid, signal.SIGTERM)
    server._stop()
    multiprocessing.resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def _launch_forked(child: Child) -> tuple[ForkedProcess, int]:
    """Fork the replica from the forkserver: no interpreter start, no imports, so restarts are fast."""
    _forkserver.set_forkserver_preload(FORKSERVER_PRELOAD)
    read_end, write_end = _forkserver.Pipe(duplex=False)
    process = _forkserver.Process(
        target=run_forked_child, args=(child.spec.name, child.name, write_end), name=child.name, daemon=False
    )
    process.start()
    write_end.close()
    read_fd = os.dup(read_end.fileno())
    read_end.close()
    return ForkedProcess(process), read_fd


def run_forked_child(service_name: str, replica_name: str, ready: multiprocessing.connection.Connection) -> None:
    """The body of a forked replica: die with the forkserver (which dies with the supervisor), serve."""
    from bus import forkserver_init, logs

    die_with_parent(forkserver_init.FORKSERVER_PID)
    os.environ["BITNEXUS_CHILD"] = replica_name
    os.setpgid(0, 0)  # Ctrl-C reaches the supervisor alone; it drains children in order
    logs.configure(replica_name)
    with contextlib.suppress(KeyboardInterrupt):
        serve(service_name, replica_name, os.dup(ready.fileno()))


async def _read_ready(read_fd: int, exited: asyncio.Future[int]) -> None:
    """Wait for the child's `ready` line on the pipe, or for the child to exit first."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def on_readable() -> None:
        data = os.read(read_fd, 64)
        if not ready.done():
            ready.set_result(data.startswith(b"ready"))

    loop.add_reader(read_fd, on_readable)
    try:
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(read_fd)


class StatusRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class SupervisorStatus(msgspec.Struct, frozen=True):
    pid: int
    strategy: str
    started_at: str


class ChildStatus(msgspec.Struct, frozen=True):
    name: str
    pid: int | None
    state: str
    restarts: int
    started_at: str


class MeshStatus(msgspec.Struct, frozen=True):
    supervisor: SupervisorStatus
    children: list[ChildStatus]


async def mesh_status(request: StatusRequest, supervisor: Supervisor) -> MeshStatus:
    return MeshStatus(
        supervisor=SupervisorStatus(os.getpid(), supervisor.spec.strategy, supervisor.started_at),
        children=[
            ChildStatus(
                name=child.name,
                pid=child.process.pid if child.process and child.process.returncode is None else None,
                state=child.state,
                restarts=child.restarts,
                started_at=child.started_at,
            )
            for child in supervisor.children
        ],
    )


def data_dir() -> Path:
    return Path(os.environ.get("BITNEXUS_DATA_DIR", ".bitnexus")).resolve()


STATUS_SUBJECT = "mesh.status"
SUPERVISOR_ID_FILE = "mesh.id"
"""In the data directory: the instance id of the supervisor `up` runs there, whose own
`mesh.status.<id>` `bitnexus status` asks. `mesh.status` is answered by any supervisor on the
NATS, and a health check in a scaled compose (`--scale mesh=2`) may hear the other one's."""


def package_version() -> str:
    return version("bitnexus-mesh")


def start_embedded_nats(port: int) -> tuple[EmbeddedNats, str]:
    """The embedded server; when `port` is taken, another free port, said in one line."""
    from bus.embedded import EmbeddedNats, PortTaken, free_port

    server = EmbeddedNats(data_dir=data_dir() / "nats", port=port)
    try:
        return server, server.start()
    except PortTaken:
        server.port = free_port()
        url = server.start()
        print(
            f"bitnexus: port {port} is taken (another NATS server?); the embedded nats-server listens on {url} "
            f"instead. To use the server on {port}, run with NATS_URL=nats://127.0.0.1:{port}",
            file=sys.stderr,
            flush=True,
        )
        return server, url


async def keep_nats_up(server: EmbeddedNats, supervisor: Supervisor) -> None:
    """Start the embedded nats-server again whenever it exits, on its port and JetStream store,
    as the supervisor restarts a child, against the same intensity. The services reconnect by
    themselves. Past the intensity, or when it does not start, `Escalation`: the mesh stops."""
    from bus.embedded import PortTaken

    assert server.process is not None
    while True:
        await asyncio.sleep(nats_check_interval_s)
        code = server.process.poll()
        if code is None:
            continue
        log.error("child terminated", extra={"context": "child_terminated", "offender": "nats-server", "reason": code})
        supervisor.count_restart()
        try:
            await asyncio.to_thread(server.start)
        except (PortTaken, RuntimeError, TimeoutError) as exc:
            raise Escalation(f"nats-server did not start again: {exc}") from exc
        log.info("child started", extra={"context": "child_started", "offender": "nats-server"})


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a group of groups (a task group's inside `except*`'s)."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def up(config: MeshConfig) -> int:
    """Start everything, serve `mesh.status`, and on SIGTERM/Ctrl-C drain in reverse order."""
    import migrations
    from bus.connection import Settings, connect, without_secrets
    from bus.events import require_jetstream
    from bus.service import Service

    (data_dir() / SUPERVISOR_ID_FILE).unlink(missing_ok=True)  # a crashed run's: not ours
    await migrations.upgrade_async()  # first: a database that takes no connection stops us before anything runs
    server = None
    if not os.environ.get("NATS_URL"):
        port = int(os.environ.get("BITNEXUS_NATS_PORT", config.nats.port))
        server, os.environ["NATS_URL"] = start_embedded_nats(port)
    (data_dir() / "nats.url").write_text(os.environ["NATS_URL"] + "\n")
    log.info("nats at %s", without_secrets(os.environ["NATS_URL"]))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    supervisor = Supervisor(config.supervisor)
    nc = await connect(Settings.from_env(service=SUPERVISOR), name="mesh")
    service = Service(nc, "mesh", package_version(), "the BitNexus Mesh supervisor")
    service.add_endpoint(STATUS_SUBJECT, mesh_status, supervisor)
    service.add_endpoint(f"{STATUS_SUBJECT}.{service.id}", mesh_status, supervisor)
    (data_dir() / SUPERVISOR_ID_FILE).write_text(service.id + "\n")
    exit_code = 0
    try:
        await require_jetstream(nc.jetstream(), os.environ["NATS_URL"])
        async with service.serving(), asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(keep_nats_up(server, supervisor)) if server is not None else None
            await supervisor.run(stop)
            if watcher is not None:
                watcher.cancel()
    except* Escalation as group:
        log.error("supervisor gave up: %s", first_leaf(group))
        exit_code = 1
    finally:
        if nc.is_connected:
            await nc.drain()
        else:  # its server is gone: nothing to drain through
            await nc.close()
        if server is not None:
            server.stop()
    return exit_code


async def status(url: str, json_output: bool) -> int:
    import nats

    from bus.connection import Settings, without_secrets

    subject = status_subject()
    if subject is None:
        print(f"bitnexus: the mesh running from {data_dir()} is starting", file=sys.stderr)
        return 1
    settings = Settings.from_env(service=SUPERVISOR)  # the server may require the supervisor's credentials
    failures: list[Exception] = []

    async def remember(exc: Exception) -> None:
        failures.append(exc)

    try:  # nats-py tries a server max_reconnect_attempts + 1 times even on the first connect
        nc = await nats.connect(
            url,
            allow_reconnect=False,
            connect_timeout=2,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=remember,
            **settings.client_options(),
        )
    except Exception as exc:
        reason = failures[-1] if failures else exc
        print(f"bitnexus: cannot reach NATS at {without_secrets(url)}: {reason}", file=sys.stderr)
        return 1
    try:
        reply = await nc.request(subject, b"{}", timeout=2)
    except Exception:
        print(f"bitnexus: no mesh answers {subject} at {without_secrets(url)}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    if json_output:
        print(reply.data.decode())
        return 0
    print(render_status(msgspec.json.decode(reply.data, type=MeshStatus), time.time()))
    return 0


def status_subject() -> str | None:
    """Where to ask: the own subject of the supervisor `up` runs from this data directory (None
    while it starts), else `mesh.status`, answered by any."""
    if not up_running_here():
        return STATUS_SUBJECT
    saved = data_dir() / SUPERVISOR_ID_FILE
    return f"{STATUS_SUBJECT}.{saved.read_text().strip()}" if saved.exists() else None


def up_running_here() -> bool:
    """Whether an `up` holds this data directory's `up.lock`: probed with a shared lock, given
    back at once (`one_mesh_per_data_dir` tries again while a probe holds it)."""
    try:
        lock = open(data_dir() / "up.lock")  # closed below, and the probe's lock with it
    except OSError:  # none, or another user's that we may not read: no mesh of ours here
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def render_status(status: MeshStatus, now: float) -> str:
    from datetime import datetime

    def uptime(started_at: str) -> str:
        if not started_at:
            return "-"
        seconds = int(now - datetime.fromisoformat(started_at.replace("Z", "+00:00")).timestamp())
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"

    top = status.supervisor
    lines = [f"mesh  pid {top.pid}  {top.strategy}  up {uptime(top.started_at)}"]
    lines.append(f"  {'CHILD':<18}{'PID':>8}  {'STATE':<10}{'RESTARTS':>8}  UPTIME")
    for child in status.children:
        pid = str(child.pid) if child.pid else "-"
        lines.append(f"  {child.name:<18}{pid:>8}  {child.state:<10}{child.restarts:>8}  {uptime(child.started_at)}")
    return "\n".join(lines)


async def supervise(config: MeshConfig) -> int:
    """A nested supervisor: its own children and intensity, no NATS of its own. It says ready to its
    parent once its children run, and exits 1 past its intensity, so the parent's strategy decides."""
    from bus.runner import notify_ready, ready_fd_from_env

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    ready_fd = ready_fd_from_env()
    try:
        await Supervisor(config.supervisor).run(stop, on_started=lambda: notify_ready(ready_fd))
    except Escalation as exc:
        log.error("supervisor gave up: %s", exc)
        return 1
    return 0


def serving_of(service_name: str) -> Serving:
    """The service's serving context manager, from `SERVICES`."""
    module_name, function_name = SERVICES[service_name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def serve(service_name: str, replica_name: str, ready_fd: int | None) -> None:
    """Serve one replica until stopped. Credentials or permissions the NATS server refuses end
    it with one line and exit 1 (its supervisor counts it as a crash), not a traceback."""
    from bus.connection import LoginRefused, SubscriptionRefused
    from bus.runner import serve_until_stopped

    try:
        asyncio.run(serve_until_stopped(replica_name, serving_of(service_name), ready_fd, service_name))
    except (LoginRefused, SubscriptionRefused) as exc:
        log.error("%s", exc)
        sys.exit(1)


def nats_url_for_status() -> str:
    """The first of the mesh's NATS URLs: `NATS_URL`, else the one the last `up` here saved."""
    saved = data_dir() / "nats.url"
    if os.environ.get("NATS_URL"):
        urls = os.environ["NATS_URL"]
    elif saved.exists():
        urls = saved.read_text().strip()
    else:
        urls = "nats://127.0.0.1:4222"
    return urls.split(",")[0]


def up_config(path: Path | None) -> MeshConfig:
    """`--config`, else `deploy/mesh.toml` when run where it is, else the whole mesh."""
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return load_config(path) if path else WHOLE_MESH


class MeshAlreadyRunning(Exception):
    """Another `bitnexus up` holds the data directory."""


@contextlib.contextmanager
def one_mesh_per_data_dir() -> Iterator[None]:
    """Hold `up.lock` in the data directory while the mesh runs. A second `up` there would start
    a second embedded nats-server on the same JetStream store, run every service again on the
    same SQLite files and take over `nats.url`. The lock is the kernel's (flock): it ends with
    the process, however it ends, so a crash leaves nothing stale."""
    data_dir().mkdir(parents=True, exist_ok=True)
    with open(data_dir() / "up.lock", "a+") as lock:
        try:
            _lock_at_once(lock)
        except BlockingIOError:
            lock.seek(0)
            raise MeshAlreadyRunning(
                f"a mesh is already running from {data_dir()} (pid {lock.read().strip() or '?'}): "
                "stop it first, or give this one its own BITNEXUS_DATA_DIR"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


lock_attempts = 3
lock_attempts_apart_s = 0.05


def _lock_at_once(lock: IO[str]) -> None:
    """The exclusive lock, or `BlockingIOError`; tried again briefly, as `bitnexus status` may
    hold a shared one for a moment to see whether a mesh runs here (`up_running_here`)."""
    for _ in range(lock_attempts - 1):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(lock_attempts_apart_s)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def setting_faults_said() -> Iterator[None]:
    """A config that cannot be read, a `DATABASE_URL` that names no usable database or takes no
    connection, a migration locked out, tables not migrated (`serve` alone), credentials NATS
    refuses, a NATS without JetStream or a mesh already running is said in one line, exit 1: not
    a traceback, and not a restart storm of every service."""
    import migrations
    from bus.connection import LoginRefused
    from bus.events import NoJetStream
    from schemas.database import BadDatabaseUrl

    faults = (
        BadConfig,
        BadDatabaseUrl,
        migrations.DatabaseUnreachable,
        migrations.MigrationLockedOut,
        migrations.NotMigrated,
        LoginRefused,
        NoJetStream,
        MeshAlreadyRunning,
    )
    try:
        yield
    except faults as exc:
        print(f"bitnexus: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    from bus import logs

    parser = argparse.ArgumentParser(prog="bitnexus", description="BitNexus Mesh")
    parser.add_argument("--log-format", choices=["plain", "json"], default="plain")
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start the whole mesh under the supervisor")
    up_parser.add_argument(
        "--config", type=Path, default=None, help=f"default: {DEFAULT_CONFIG} when it exists, else every service once"
    )
    supervise_parser = commands.add_parser("supervise", help="run a nested supervisor (a child of another)")
    supervise_parser.add_argument("--config", type=Path, required=True)
    status_parser = commands.add_parser("status", help="print the process tree of a running mesh")
    status_parser.add_argument("--json", action="store_true")
    migrate_parser = commands.add_parser("migrate", help="apply the database migrations of every service")
    migrate_parser.add_argument("--down", action="store_true", help="undo them all instead")
    serve_parser = commands.add_parser("serve", help="run one service replica (the supervisor does this)")
    serve_parser.add_argument("service", choices=sorted(SERVICES))
    serve_parser.add_argument("--as", dest="replica", default=None)
    options = parser.parse_args(argv)
    os.environ.setdefault("BITNEXUS_LOG_FORMAT", options.log_format)
    if options.command == "status":
        sys.exit(asyncio.run(status(nats_url_for_status(), options.json)))
    # Only now: a container's health check runs `status` every 10 s, and importing alembic and
    # SQLAlchemy was two thirds of its time (1.2-1.35 s against a running mesh, session 25).
    import migrations

    if options.command == "up":
        logs.configure("supervisor")
        with setting_faults_said():
            config = up_config(options.config)
        with setting_faults_said(), one_mesh_per_data_dir():
            sys.exit(asyncio.run(up(config)))
    if options.command == "migrate":
        logs.configure("migrate")
        with setting_faults_said():
            migrations.downgrade() if options.down else migrations.upgrade()
        return
    if options.command == "supervise":
        logs.configure(os.environ.get("BITNEXUS_CHILD", "supervisor"))
        with setting_faults_said():
            config = load_config(options.config)
        sys.exit(asyncio.run(supervise(config)))
    replica = options.replica or f"{options.service}.1"
    logs.configure(replica)
    from bus.runner import ready_fd_from_env

    with setting_faults_said():
        asyncio.run(migrations.require_current(TABLES_OF[options.service]))
    with contextlib.suppress(KeyboardInterrupt):
        serve(options.service, replica, ready_fd_from_env())


if __name__ == "__main__":
    main()
