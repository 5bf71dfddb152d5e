"""`bitnexus up` and `bitnexus status` as a person runs them: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bus.embedded import EmbeddedNats


def bitnexus(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", *args]


def wait_for_file(path: Path, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise TimeoutError(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_up_on_a_taken_port_says_so_in_one_line_serves_status_and_stops_on_sigterm(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path), "BITNEXUS_NATS_PORT": str(nats_server.port)}
    env.pop("NATS_URL", None)
    config = tmp_path / "mesh.toml"
    config.write_text('[supervisor]\nstrategy = "one_for_one"\n')
    up = subprocess.Popen(bitnexus("up", "--config", str(config)), env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_for_file(tmp_path / "nats.url")
        assert url != nats_server.url
        status = subprocess.run(bitnexus("status", "--json"), env=env, capture_output=True, text=True, check=True)
        reply = json.loads(status.stdout)
        assert reply["supervisor"]["pid"] == up.pid
        assert reply["supervisor"]["strategy"] == "one_for_one"
        assert reply["children"] == []
        table = subprocess.run(bitnexus("status"), env=env, capture_output=True, text=True, check=True).stdout
        assert f"mesh  pid {up.pid}  one_for_one" in table
        server_pids = [
            int(p) for p in subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        ]
        assert len(server_pids) == 1
    finally:
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=20)
    assert up.returncode == 0
    first_line = stderr.splitlines()[0]
    assert first_line.startswith(f"bitnexus: port {nats_server.port} is taken")
    assert url in first_line and f"NATS_URL=nats://127.0.0.1:{nats_server.port}" in first_line
    assert "Traceback" not in stderr
    assert not pid_alive(server_pids[0])


def test_status_without_a_mesh_says_so_without_a_traceback(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    env = {**os.environ, "NATS_URL": nats_server.url}
    result = subprocess.run(bitnexus("status"), env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"bitnexus: no mesh answers mesh.status at {nats_server.url}"


def test_json_logs_are_one_object_per_line_tagged_with_child_and_pid(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    env = {**os.environ, "NATS_URL": nats_server.url, "BITNEXUS_DATA_DIR": str(tmp_path)}
    env.pop("BITNEXUS_LOG_FORMAT", None)
    config = tmp_path / "mesh.toml"
    config.write_text('[supervisor]\n\n[[supervisor.children]]\nname = "accounts"\n')
    up = subprocess.Popen(
        bitnexus("--log-format", "json", "up", "--config", str(config)), env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_file(tmp_path / "nats.url")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = subprocess.run(bitnexus("status", "--json"), env=env, capture_output=True, text=True)
            if status.returncode == 0 and '"running"' in status.stdout:
                break
            time.sleep(0.1)
    finally:
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=30)
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records
    assert all({"time", "level", "child", "pid", "logger", "message"} <= set(record) for record in records)
    children = {record["child"] for record in records}
    assert {"supervisor", "accounts.1"} <= children
    started = next(record for record in records if record["message"] == "child started")
    assert started["child"] == "supervisor" and started["context"] == "child_started"
