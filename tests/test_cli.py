"""`bitnexus up` and `bitnexus status` as a person runs them: real processes, real signals."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.embedded import EmbeddedNats, free_port, server_binary
from schemas.database import URL_FORMS, BadDatabaseUrl, service_url


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
    (said,) = [line for line in stderr.splitlines() if line.startswith("bitnexus:")]  # after the migrations' log
    assert said.startswith(f"bitnexus: port {nats_server.port} is taken")
    assert url in said and f"NATS_URL=nats://127.0.0.1:{nats_server.port}" in said
    assert "Traceback" not in stderr
    assert not pid_alive(server_pids[0])


def test_status_without_a_mesh_says_so_without_a_traceback(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    env = {**os.environ, "NATS_URL": nats_server.url}
    result = subprocess.run(bitnexus("status"), env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"bitnexus: no mesh answers mesh.status at {nats_server.url}"


def test_status_says_in_one_line_and_seconds_that_nats_is_unreachable_never_saying_a_password(tmp_path: Path) -> None:
    closed_port = free_port()
    (tmp_path / "nats.url").write_text(f"nats://mesh:s3cret@127.0.0.1:{closed_port},nats://mesh:s3cret@127.0.0.1:1\n")
    env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path)}
    env.pop("NATS_URL", None)
    result = subprocess.run(bitnexus("status"), env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    (said,) = result.stderr.splitlines()  # nats-py's own error log would add a traceback
    assert said.startswith(f"bitnexus: cannot reach NATS at nats://***@127.0.0.1:{closed_port}: ")
    assert "s3cret" not in said and "Connect call failed" in said


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


def test_status_asks_the_supervisor_running_from_its_data_directory_not_any_on_the_nats(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Two meshes on one NATS, as `--scale mesh=2` runs them: `mesh.status` is answered by
    either, so each container's health check heard the other's supervisor half of the time."""
    config = tmp_path / "mesh.toml"
    config.write_text('[supervisor]\nstrategy = "one_for_one"\n')
    envs = [{**os.environ, "NATS_URL": nats_server.url, "BITNEXUS_DATA_DIR": str(tmp_path / name)} for name in "ab"]
    ups = [subprocess.Popen(bitnexus("up", "--config", str(config)), env=env) for env in envs]
    try:
        for env in envs:
            wait_for_status(env)
        for _ in range(8):  # either would answer `mesh.status` about half of the time
            for up, env in zip(ups, envs, strict=True):
                assert wait_for_status(env)["supervisor"]["pid"] == up.pid
        anywhere = {**os.environ, "NATS_URL": nats_server.url, "BITNEXUS_DATA_DIR": str(tmp_path / "elsewhere")}
        assert wait_for_status(anywhere)["supervisor"]["pid"] in {up.pid for up in ups}  # no mesh here: any
        ups[0].send_signal(signal.SIGSTOP)  # hung: its lock held, its own subject unanswered
        hung = subprocess.run(bitnexus("status"), env=envs[0], capture_output=True, text=True, timeout=20)
        assert hung.returncode == 1
        assert hung.stderr.startswith("bitnexus: no mesh answers mesh.status."), hung.stderr
        ups[0].send_signal(signal.SIGCONT)
    finally:
        for up in ups:
            up.send_signal(signal.SIGCONT)
            up.send_signal(signal.SIGTERM)
        assert [up.wait(timeout=30) for up in ups] == [0, 0]


def test_status_imports_no_database_code(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    """`bitnexus status` is a container's health check, run every 10 s (deploy/Dockerfile): until
    session 25 it imported alembic and SQLAlchemy, half of the 1.7 s (and of the CPU) it took."""
    env = {**os.environ, "NATS_URL": nats_server.url, "BITNEXUS_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-X", "importtime", *bitnexus("status")[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1, result.stderr  # no mesh answers: it asked NATS all the same
    assert "bitnexus: no mesh answers mesh.status" in result.stderr
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "nats" in imported
    database_code = {"alembic", "sqlalchemy", "asyncpg", "aiosqlite", "migrations"}
    assert not {name for name in imported if name.split(".")[0] in database_code}


def test_status_while_the_mesh_of_its_data_directory_starts_says_so(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    """Its lock held, its id not written yet: not another mesh's answer."""
    env = {**os.environ, "NATS_URL": nats_server.url, "BITNEXUS_DATA_DIR": str(tmp_path)}
    with open(tmp_path / "up.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(bitnexus("status"), env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.strip() == f"bitnexus: the mesh running from {tmp_path.resolve()} is starting"


def embedded_server_pid(up_pid: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(up_pid)], capture_output=True, text=True).stdout.split()
    (pid,) = [int(pid) for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "nats-server"]
    return pid


def wait_for_status(env: dict[str, str], timeout_s: float = 20.0) -> dict:
    """`bitnexus status --json` once the mesh answers with every child running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = subprocess.run(bitnexus("status", "--json"), env=env, capture_output=True, text=True)
        if status.returncode == 0:
            reply = json.loads(status.stdout)
            if all(child["state"] == "running" for child in reply["children"]):
                return reply
        time.sleep(0.1)
    raise TimeoutError("mesh.status")


def up_with_embedded_nats(tmp_path: Path, restarts_max: int) -> tuple[subprocess.Popen, dict[str, str]]:
    env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path), "BITNEXUS_NATS_PORT": str(free_port())}
    env.pop("NATS_URL", None)
    config = tmp_path / "mesh.toml"
    intensity = f"restarts_max = {restarts_max}\nrestart_period_s = 60\n"
    config.write_text(f'[supervisor]\n{intensity}\n[[supervisor.children]]\nname = "accounts"\n')
    up = subprocess.Popen(bitnexus("up", "--config", str(config)), env=env, stderr=subprocess.PIPE, text=True)
    env["NATS_URL"] = wait_for_file(tmp_path / "nats.url")
    return up, env


def test_up_starts_its_killed_nats_server_again_on_its_port_and_the_mesh_serves_on(tmp_path: Path) -> None:
    up, env = up_with_embedded_nats(tmp_path, restarts_max=3)
    try:
        before = wait_for_status(env)
        first = embedded_server_pid(up.pid)
        os.kill(first, signal.SIGKILL)
        after = wait_for_status(env)
        assert embedded_server_pid(up.pid) != first
        assert (tmp_path / "nats.url").read_text().strip() == env["NATS_URL"]  # the same port
        assert [child["pid"] for child in after["children"]] == [child["pid"] for child in before["children"]]
        ping = subprocess.run(
            [sys.executable, "-c", PING_ACCOUNTS, env["NATS_URL"]], capture_output=True, text=True, timeout=30
        )
        assert ping.returncode == 0, ping.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=30)
    assert up.returncode == 0
    assert "Traceback" not in stderr


def test_up_as_pid_1_like_a_container_entrypoint_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    """In a container `bitnexus up` is pid 1. Its children (nats-server, the forkserver, each
    replica) used to take a parent of pid 1 for init, which adopts orphans, and killed
    themselves at once: the mesh never started."""
    env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path), "BITNEXUS_NATS_PORT": str(free_port())}
    env.pop("NATS_URL", None)
    config = tmp_path / "mesh.toml"
    config.write_text('[[supervisor.children]]\nname = "accounts"\n')
    in_pid_namespace = ["unshare", "--map-root-user", "--pid", "--fork", "--kill-child"]
    up = subprocess.Popen(
        [*in_pid_namespace, *bitnexus("up", "--config", str(config))], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        env["NATS_URL"] = wait_for_file(tmp_path / "nats.url")
        reply = wait_for_status(env)
        assert reply["supervisor"]["pid"] == 1
        assert [child["name"] for child in reply["children"]] == ["accounts.1"]
        (entrypoint,) = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(entrypoint), signal.SIGTERM)
        _, stderr = up.communicate(timeout=30)
    finally:
        up.kill()
    assert up.returncode == 0, stderr
    assert "Traceback" not in stderr


PING_ACCOUNTS = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    for _ in range(100):  # the service reconnects by itself, within its 0.5-2 s wait
        try:
            await nc.request("$SRV.PING.accounts", b"", timeout=0.5)
            break
        except nats.errors.Error:
            await asyncio.sleep(0.1)
    else:
        sys.exit("accounts never answered")
    await nc.close()
asyncio.run(main())
"""


def test_up_past_its_restart_intensity_for_nats_server_stops_the_mesh_and_exits_1(tmp_path: Path) -> None:
    up, env = up_with_embedded_nats(tmp_path, restarts_max=1)
    try:
        wait_for_status(env)
        children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        os.kill(embedded_server_pid(up.pid), signal.SIGKILL)
        wait_for_status(env)  # the first restart is within the intensity
        os.kill(embedded_server_pid(up.pid), signal.SIGKILL)
        _, stderr = up.communicate(timeout=60)
    finally:
        up.kill()
    assert up.returncode == 1
    assert "supervisor gave up: more than 1 restarts in 60.0 s" in stderr
    assert "Traceback" not in stderr
    assert not any(pid_alive(int(pid)) for pid in children)  # the forkserver, its services, nats-server


def test_up_and_migrate_say_in_one_line_that_the_database_takes_no_connection(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    refused = f"postgresql+asyncpg://postgres:secret@127.0.0.1:{port}/mesh"
    missing = "postgresql+asyncpg://postgres@127.0.0.1:5432/bitnexus_no_such_database"
    env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path), "BITNEXUS_NATS_PORT": str(free_port())}
    env.pop("NATS_URL", None)
    for url, reason in [(refused, f"Connect call failed ('127.0.0.1', {port})"), (missing, "does not exist")]:
        for command in ("up", "migrate"):
            result = subprocess.run(bitnexus(command), env={**env, "DATABASE_URL": url}, capture_output=True, text=True)
            assert result.returncode == 1
            said = url.replace(":secret@", ":***@")
            assert result.stderr.startswith(f"bitnexus: cannot reach the database at {said}: "), result.stderr
            assert reason in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nats").exists()  # up stopped before starting anything


def test_migrate_says_within_the_connect_timeout_that_a_silent_database_takes_no_connection(tmp_path: Path) -> None:
    """A server behind a dropped route neither accepts nor refuses: asyncpg waited 60 s. The
    timeout is libpq's `connect_timeout` in the URL's query, 5 s without it."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/mesh?connect_timeout=1.5"
        env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path), "DATABASE_URL": url}
        result = subprocess.run(bitnexus("migrate"), env=env, capture_output=True, text=True, timeout=15)
    assert result.returncode == 1
    said = url.replace("postgresql:", "postgresql+asyncpg:")
    assert result.stderr.strip() == (
        f"bitnexus: cannot reach the database at {said}: no connection to the database within 1.5 s"
    )


def test_serve_alone_on_tables_not_migrated_says_so_in_one_line_and_serves_nothing(tmp_path: Path) -> None:
    """`up` migrates first; a replica started alone (one per container) used to serve, then
    crash on its first missing table with a traceback."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/mesh.db", "NATS_URL": "nats://127.0.0.1:1"}
    for service, tables in [("accounts", "accounts"), ("ledger_events", "ledger")]:
        result = subprocess.run(bitnexus("serve", service), env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"bitnexus: the {tables} tables at sqlite+aiosqlite:///{tmp_path}/mesh.{tables}.db"
        )
        assert "run `bitnexus migrate` first" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def wait_for_listener(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_up_says_in_one_line_that_its_nats_server_has_no_jetstream_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    without_jetstream = subprocess.Popen(
        [str(server_binary()), "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_listener(port)
        url = f"nats://mesh:secret@127.0.0.1:{port}"
        env = {**os.environ, "NATS_URL": url, "BITNEXUS_DATA_DIR": str(tmp_path)}
        result = subprocess.run(bitnexus("up"), env=env, capture_output=True, text=True, timeout=60)
    finally:
        without_jetstream.terminate()
        without_jetstream.wait()
    assert result.returncode == 1
    (said,) = [line for line in result.stderr.splitlines() if line.startswith("bitnexus:")]
    assert said.startswith(f"bitnexus: the NATS server at nats://***@127.0.0.1:{port} offers no JetStream")
    assert "secret" not in result.stderr and "Traceback" not in result.stderr
    assert "child started" not in result.stderr


def test_a_second_up_on_the_same_data_dir_says_which_mesh_runs_there_and_starts_nothing(tmp_path: Path) -> None:
    first, env = up_with_embedded_nats(tmp_path, restarts_max=3)
    try:
        wait_for_status(env)
        url = (tmp_path / "nats.url").read_text()
        second = subprocess.run(bitnexus("up"), env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr == (
            f"bitnexus: a mesh is already running from {tmp_path} (pid {first.pid}): "
            "stop it first, or give this one its own BITNEXUS_DATA_DIR\n"
        )
        assert (tmp_path / "nats.url").read_text() == url
        assert wait_for_status(env)["supervisor"]["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0
    (tmp_path / "nats.url").unlink()  # the third's URL is awaited there
    third, env = up_with_embedded_nats(tmp_path, restarts_max=3)  # the lock ended with the first
    try:
        assert wait_for_status(env)["supervisor"]["pid"] == third.pid
    finally:
        third.send_signal(signal.SIGTERM)
        third.communicate(timeout=30)
    assert third.returncode == 0


def test_database_urls_take_the_plain_schemes_and_name_each_services_sqlite_file(tmp_path: Path) -> None:
    postgres = service_url("ledger", "postgres://mesh:pw@db.example:5433/mesh")
    assert postgres.render_as_string(hide_password=False) == "postgresql+asyncpg://mesh:pw@db.example:5433/mesh"
    assert service_url("ledger", "postgresql://db.example/mesh").drivername == "postgresql+asyncpg"
    sqlite = service_url("ledger", f"sqlite:///{tmp_path}/data/mesh.db")
    assert (sqlite.drivername, sqlite.database) == ("sqlite+aiosqlite", f"{tmp_path}/data/mesh.ledger.db")
    assert (tmp_path / "data").is_dir()


def test_a_database_url_naming_nothing_usable_says_what_is_wrong(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for url, said in [
        ("nonsense", "DATABASE_URL is not a URL; expected sqlite+aiosqlite:///path/mesh.db or postgresql+asyncpg:"),
        ("mysql://mesh@db/mesh", "DATABASE_URL names 'mysql'; expected sqlite+aiosqlite:///path/mesh.db or "),
        ("sqlite://", "DATABASE_URL names no SQLite file, and each service keeps its own; expected "),
        (f"sqlite:///{not_a_dir}/mesh.db", f"DATABASE_URL's SQLite files go in {not_a_dir}, which cannot be made: "),
        ("postgresql://db/mesh?connect_timeout=0", "DATABASE_URL's connect_timeout takes seconds above 0"),
        ("postgresql://db/mesh?connect_timeout=soon", "DATABASE_URL's connect_timeout takes seconds above 0"),
        ("postgresql://db/mesh?tcp_user_timeout=-1", "DATABASE_URL's connect_timeout takes seconds above 0"),
    ]:
        with pytest.raises(BadDatabaseUrl) as raised:
            service_url("ledger", url)
        assert str(raised.value).startswith(said)


def test_up_and_migrate_say_in_one_line_what_is_wrong_with_database_url(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "mysql://mesh@db/mesh", "BITNEXUS_DATA_DIR": str(tmp_path)}
    for command in ("up", "migrate"):
        result = subprocess.run(bitnexus(command), env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr == f"bitnexus: DATABASE_URL names 'mysql'; expected {URL_FORMS}\n"


def test_up_and_supervise_say_in_one_line_what_is_wrong_with_their_config(tmp_path: Path) -> None:
    """A typo in mesh.toml, or a --config naming no file, must not start a mesh of defaults."""
    env = {**os.environ, "BITNEXUS_DATA_DIR": str(tmp_path), "NATS_URL": "nats://127.0.0.1:1"}
    misspelled = tmp_path / "mesh.toml"
    misspelled.write_text("[supervisor]\nrestarts_maxx = 1\n")
    expected = {
        misspelled: f"bitnexus: {misspelled}: Object contains unknown field `restarts_maxx` - at `$.supervisor`\n",
        tmp_path / "nope.toml": f"bitnexus: {tmp_path / 'nope.toml'}: no such file\n",
    }
    for config, said in expected.items():
        for command in ("up", "supervise"):
            result = subprocess.run(
                bitnexus(command, "--config", str(config)), env=env, capture_output=True, text=True, timeout=60
            )
            assert (result.returncode, result.stderr) == (1, said), command
