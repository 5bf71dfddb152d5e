"""The supervisor with real processes: restarts, strategies, intensity, drain, no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from tests.conftest import Mesh
from tests.test_cli import bitnexus, pid_alive


def config(strategy: str, children: list[tuple[str, int]], restarts_max: int = 5, period_s: float = 5) -> str:
    text = f'[supervisor]\nstrategy = "{strategy}"\nrestarts_max = {restarts_max}\nrestart_period_s = {period_s}\n'
    for name, replicas in children:
        text += f'\n[[supervisor.children]]\nname = "{name}"\nreplicas = {replicas}\nshutdown_s = 10\n'
    return text


class RunningMesh:
    def __init__(self, process: subprocess.Popen, mesh: Mesh) -> None:
        self.process = process
        self.mesh = mesh

    async def status(self) -> dict:
        return await self.mesh.ok("mesh.status", {})

    async def pids(self) -> dict[str, int]:
        return {child["name"]: child["pid"] for child in (await self.status())["children"]}

    async def wait_for(self, check: Callable[[dict], bool], timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status = await self.status()
                if check(status):
                    return status
            except Exception:  # the supervisor may be between states
                pass
            await asyncio.sleep(0.05)
        raise TimeoutError("mesh never reached the expected state")

    def descendants(self) -> list[int]:
        found, frontier = [], [self.process.pid]
        while frontier:
            parent = frontier.pop()
            out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
            found += [int(pid) for pid in out]
            frontier += [int(pid) for pid in out]
        return found


def all_running(status: dict) -> bool:
    return bool(status["children"]) and all(child["state"] == "running" for child in status["children"])


@pytest.fixture
def start_mesh(nc: Client, nats_url: str, tmp_path: Path) -> Callable[[str], AsyncIterator[RunningMesh]]:
    import contextlib

    @contextlib.asynccontextmanager
    async def start(config_text: str) -> AsyncIterator[RunningMesh]:
        (tmp_path / "mesh.toml").write_text(config_text)
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "BITNEXUS_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'mesh.db'}",
            "BITNEXUS_LOG_LEVEL": "WARNING",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "up", "--config", str(tmp_path / "mesh.toml")], env=env
        )
        running = RunningMesh(process, Mesh(nc))
        try:
            await running.wait_for(all_running)
            yield running
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    return start


async def test_killed_replica_comes_back_serving_with_its_restart_counted(start_mesh) -> None:
    async with start_mesh(config("one_for_one", [("accounts", 2)])) as mesh:
        before = await mesh.pids()
        os.kill(before["accounts.1"], signal.SIGKILL)
        status = await mesh.wait_for(lambda s: all_running(s) and s["children"][0]["restarts"] == 1)
        after = {child["name"]: child for child in status["children"]}
        assert after["accounts.1"]["pid"] not in (None, before["accounts.1"])
        assert after["accounts.2"]["pid"] == before["accounts.2"] and after["accounts.2"]["restarts"] == 0
        assert not pid_alive(before["accounts.1"])
        await asyncio.sleep(0.2)
        pings = await collect(mesh.mesh.nc, "$SRV.PING.accounts", 2)
        assert {ping["metadata"]["pid"] for ping in pings} == {
            str(after["accounts.1"]["pid"]),
            str(after["accounts.2"]["pid"]),
        }
        assert await mesh.mesh.ok("accounts.users.list", {}) == {"items": [], "next_after_id": None}


async def collect(nc: Client, subject: str, count: int) -> list[dict]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    replies = [json.loads((await sub.next_msg(timeout=3)).data) for _ in range(count)]
    await sub.unsubscribe()
    return replies


@pytest.mark.parametrize(
    ("strategy", "killed", "restarted"),
    [
        ("one_for_one", "accounts.1", {"accounts.1"}),
        ("one_for_all", "accounts.1", {"ledger.1", "accounts.1", "products.1"}),
        ("rest_for_one", "accounts.1", {"accounts.1", "products.1"}),
    ],
)
async def test_each_strategy_restarts_the_siblings_it_names(
    start_mesh, strategy: str, killed: str, restarted: set[str]
) -> None:
    async with start_mesh(config(strategy, [("ledger", 1), ("accounts", 1), ("products", 1)])) as mesh:
        before = await mesh.pids()
        os.kill(before[killed], signal.SIGKILL)
        status = await mesh.wait_for(lambda s: all_running(s) and any(c["restarts"] for c in s["children"]))
        after = {child["name"]: child["pid"] for child in status["children"]}
        changed = {name for name in before if after[name] != before[name]}
        assert changed == restarted
        assert all(not pid_alive(before[name]) for name in restarted)


async def test_past_the_restart_intensity_the_supervisor_gives_up_and_leaves_nothing(start_mesh) -> None:
    async with start_mesh(
        config("one_for_one", [("accounts", 1), ("products", 1)], restarts_max=1, period_s=30)
    ) as mesh:
        descendants = mesh.descendants()
        os.kill((await mesh.pids())["accounts.1"], signal.SIGKILL)
        await mesh.wait_for(lambda s: all_running(s) and s["children"][0]["restarts"] == 1)
        descendants += mesh.descendants()
        os.kill((await mesh.pids())["accounts.1"], signal.SIGKILL)
        assert mesh.process.wait(30) == 1
        await asyncio.sleep(0.5)
        assert [pid for pid in descendants if pid_alive(pid)] == []


async def test_sigkill_of_the_supervisor_leaves_no_process_behind(start_mesh) -> None:
    async with start_mesh(config("one_for_one", [("ledger", 1), ("accounts", 2)])) as mesh:
        descendants = mesh.descendants()
        assert len(descendants) >= 4  # forkserver and three replicas
        mesh.process.send_signal(signal.SIGKILL)
        mesh.process.wait(10)
        deadline = time.monotonic() + 15
        while [pid for pid in descendants if pid_alive(pid)] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert [pid for pid in descendants if pid_alive(pid)] == []


def test_a_child_whose_parent_died_before_it_asked_for_the_signal_ends_and_one_whose_parent_lives_stays() -> None:
    """The parent's death is told by the parent's pid, which the child got before the fork:
    an adopted child's parent is init or a subreaper, and may be neither pid 1 nor the one it
    had (`bitnexus up` as a container's pid 1 keeps its children: test_cli)."""
    asks = "import os, sys, time; from bus.parent_death import die_with_parent; die_with_parent(int(sys.argv[1]))"
    orphan = subprocess.run([sys.executable, "-c", asks, str(os.getpid() + 1_000_000)], timeout=10)
    assert orphan.returncode == -signal.SIGTERM
    kept = subprocess.run([sys.executable, "-c", asks, str(os.getpid())], timeout=10)
    assert kept.returncode == 0


async def test_sigterm_under_load_loses_no_acknowledged_request_and_leaves_nothing(start_mesh) -> None:
    async with start_mesh(config("one_for_one", [("ledger", 1)])) as mesh:
        descendants = mesh.descendants()
        acknowledged: list[dict] = []
        stop = asyncio.Event()

        async def load(worker: int) -> None:
            counter = 0
            while not stop.is_set():
                counter += 1
                body = {
                    "id": f"w{worker}-{counter}",
                    "from": "world",
                    "to": f"user:{worker}",
                    "amount": 1,
                    "currency": "EUR",
                }
                try:
                    code, reply = await mesh.mesh.request("ledger.record", body, timeout_s=5)
                except Exception:  # no responders once it stopped: not acknowledged
                    await asyncio.sleep(0.01)
                    continue
                if code is None:
                    acknowledged.append(reply)

        workers = [asyncio.create_task(load(n)) for n in range(16)]
        await asyncio.sleep(1.0)
        mesh.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(mesh.process.wait, 30)
        survivors = [pid for pid in descendants if pid_alive(pid)]  # at once: the supervisor reaps all
        stop.set()
        await asyncio.gather(*workers)
        assert exit_code == 0
        assert len(acknowledged) > 100
        assert survivors == []
    async with start_mesh(config("one_for_one", [("ledger", 1)])) as mesh:
        for entry in acknowledged:
            history = await mesh.mesh.ok(
                "ledger.history", {"account": entry["to"], "after_seq": entry["seq"] - 1, "limit": 1}
            )
            assert history["items"] == [entry]


async def test_nested_supervisor_restarts_its_own_children_and_escalates_to_its_parent(
    start_mesh, tmp_path: Path
) -> None:
    sub = tmp_path / "sub.toml"
    sub.write_text(config("one_for_one", [("products", 1)], restarts_max=1, period_s=30))
    top = config("one_for_one", [("accounts", 1)]) + (
        '\n[[supervisor.children]]\nname = "shop"\n'
        f'argv = ["{sys.executable}", "-m", "supervisor", "supervise", "--config", "{sub}"]\n'
    )
    async with start_mesh(top) as mesh:
        nested_pid = (await mesh.pids())["shop.1"]
        first = await products_pid(mesh)
        os.kill(first, signal.SIGKILL)  # the nested supervisor restarts it; the top one sees nothing
        second = await wait_for_new_products_pid(mesh, first)
        assert (await mesh.pids())["shop.1"] == nested_pid
        os.kill(second, signal.SIGKILL)  # past the nested intensity: it gives up, exits 1, the top restarts it
        status = await mesh.wait_for(lambda s: all_running(s) and s["children"][1]["restarts"] == 1)
        assert status["children"][1]["pid"] != nested_pid
        assert not pid_alive(nested_pid)
        await wait_for_new_products_pid(mesh, second)


async def products_pid(mesh: RunningMesh) -> int:
    reply = await mesh.mesh.nc.request("$SRV.PING.products", b"", timeout=5)
    return int(json.loads(reply.data)["metadata"]["pid"])


async def wait_for_new_products_pid(mesh: RunningMesh, old: int) -> int:
    for _ in range(400):
        try:
            pid = await products_pid(mesh)
            if pid != old:
                return pid
        except Exception:  # none serving right now
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError("products never came back")


def test_a_child_that_never_says_it_serves_is_killed_restarted_and_counted(nats_url: str, tmp_path: Path) -> None:
    """A hung start (NATS unreachable, a wrong password retried) is a crash, as in OTP: killed
    after its start timeout, restarted within the intensity; past it the mesh stops and says
    so, instead of the supervisor dying of a timeout with a traceback."""
    (tmp_path / "mesh.toml").write_text(
        '[supervisor]\nrestarts_max = 1\nrestart_period_s = 60\n\n[[supervisor.children]]\nname = "mute"\n'
        'argv = ["sleep", "3600"]\nstart_timeout_s = 0.5\n'
    )
    env = {**os.environ, "NATS_URL": nats_url, "BITNEXUS_DATA_DIR": str(tmp_path / "data")}
    up = subprocess.run(
        bitnexus("up", "--config", str(tmp_path / "mesh.toml")), env=env, capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 1, up.stderr
    assert up.stderr.count("child did not say it serves in time; killing") == 2, up.stderr  # started, restarted
    assert "supervisor gave up" in up.stderr and "Traceback" not in up.stderr
