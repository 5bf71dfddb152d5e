"""Connection settings (TLS included, against a real server), the request helper, slow consumers
and the embedded server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoServersError

from bus.client import call
from bus.connection import LoginRefused, Settings, connect
from bus.embedded import EmbeddedNats, PortTaken, free_port, port_is_free, server_binary
from bus.errors import NotFound, RemoteError, Unavailable
from bus.service import Service


class Key(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: int


class Delay(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    seconds: float


async def find(request: Key) -> Key:
    if request.id != 1:
        raise NotFound(f"key {request.id} not found")
    return request


async def slow(request: Delay) -> Delay:
    await asyncio.sleep(request.seconds)
    return request


def test_settings_read_servers_credentials_and_tls_from_the_environment() -> None:
    settings = Settings.from_env(
        {"NATS_URL": "nats://a:4222, nats://b:4222,", "NATS_USER": "u", "NATS_PASSWORD": "p", "NATS_TLS_CA": ""}
    )
    assert settings.servers == ["nats://a:4222", "nats://b:4222"]
    assert (settings.user, settings.password, settings.token, settings.creds) == ("u", "p", None, None)
    assert settings.tls_context() is None
    assert Settings.from_env({}).servers == ["nats://127.0.0.1:4222"]


def test_a_services_own_credentials_replace_the_shared_ones_as_a_whole() -> None:
    env = {"NATS_USER": "supervisor", "NATS_PASSWORD": "s", "NATS_USER_LEDGER_EVENTS": "ledger_events"}
    env["NATS_PASSWORD_LEDGER_EVENTS"] = "le"
    own = Settings.from_env(env, service="ledger_events")
    assert (own.user, own.password, own.inbox_prefix) == ("ledger_events", "le", "_MESH_INBOX.ledger_events")
    assert Settings.from_env(env).inbox_prefix == "_INBOX"  # a process that is no service: nats-py's
    assert (Settings.from_env(env, service="ledger").user, Settings.from_env(env).user) == ("supervisor", "supervisor")
    creds_only = Settings.from_env({**env, "NATS_CREDS_LEDGER": "/etc/ledger.creds"}, service="ledger")
    assert (creds_only.creds, creds_only.user, creds_only.password) == ("/etc/ledger.creds", None, None)


async def test_call_decodes_the_reply_and_raises_error_replies_as_remote_errors(nc: Client) -> None:
    service = Service(nc, "lookup", "0.1.0")
    service.add_endpoint("lookup.find", find)
    async with service.serving():
        assert await call(nc, "lookup.find", Key(1), Key) == Key(1)
        with pytest.raises(RemoteError) as raised:
            await call(nc, "lookup.find", Key(2), Key)
    assert (raised.value.code, raised.value.type, raised.value.message) == (404, "not_found", "key 2 not found")


async def test_call_without_responders_is_unavailable_at_once(nc: Client) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable) as raised:
        await call(nc, "nobody.home", Key(1), Key, timeout_s=5)
    assert raised.value.code == 503 and raised.value.type == "unavailable"
    assert asyncio.get_running_loop().time() - started < 1


async def test_call_that_times_out_is_unavailable(nc: Client) -> None:
    service = Service(nc, "sloth", "0.1.0")
    service.add_endpoint("sloth.slow", slow)
    async with service.serving():
        with pytest.raises(Unavailable, match=r"no answer within 0\.2 s"):
            await call(nc, "sloth.slow", Delay(0.5), Delay, timeout_s=0.2)


async def test_concurrent_calls_answered_out_of_order_each_get_their_own_reply(nc: Client) -> None:
    service = Service(nc, "sloth", "0.1.0")
    service.add_endpoint("sloth.slow", slow)
    delays = [0.01 * (n % 7) for n in range(200)]  # replies arrive in another order than asked
    async with service.serving():
        with pytest.raises(Unavailable):
            await call(nc, "sloth.slow", Delay(0.3), Delay, timeout_s=0.05)  # its reply comes late
        replies = await asyncio.gather(*(call(nc, "sloth.slow", Delay(d), Delay, timeout_s=5) for d in delays))
    assert [reply.seconds for reply in replies] == delays


async def test_a_flush_returns_only_once_the_server_has_the_subscriptions_made_before_it(
    nc: Client, nats_url: str
) -> None:
    """What a service saying it serves rests on. nats-py's own `flush` writes its PING to the
    socket ahead of a SUB still queued for its flusher, so the server could answer the PONG
    before it had the subscription: a publish from elsewhere right after it was then lost."""
    written: list[bytes] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines
    transport.write = lambda data: (written.append(bytes(data)), write(data))[1]
    transport.writelines = lambda lines: (written.extend(map(bytes, lines)), writelines(lines))[1]
    try:
        first = await nc.subscribe("flushed.first")
        await nc.flush()
    finally:
        transport.write, transport.writelines = write, writelines
    commands = [line.split(b" ")[0] for line in b"".join(written).splitlines()]
    assert commands == [b"SUB", b"PING"]
    await first.unsubscribe()

    publisher = await connect(Settings(servers=[nats_url]), name="publisher")
    lost = 0
    try:
        for n in range(300):
            sub = await nc.subscribe(f"flushed.{n}")
            await nc.flush()
            await publisher.publish(f"flushed.{n}", b"x")
            await publisher.flush()  # the server has routed it, to `sub` if it had the SUB
            await nc.flush()  # and `nc` has read what the server sent it before this PONG
            lost += sub.pending_msgs == 0
            await sub.unsubscribe()
    finally:
        await publisher.close()
    assert lost == 0


async def test_credentials_refused_at_the_first_connect_raise_at_once_instead_of_retrying_forever(
    tmp_path: Path,
) -> None:
    config = tmp_path / "nats-server.conf"
    config.write_text('authorization { users = [ { user: svc, password: "right" } ] }\n')
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=free_port(), config=config)
    server.start()
    try:
        for wrong in ({"NATS_PASSWORD": "wrong"}, {}):
            settings = Settings.from_env({"NATS_URL": server.url, "NATS_USER": "svc", **wrong})
            async with asyncio.timeout(10):  # nats-py alone tried again every 0.5-2 s, forever
                with pytest.raises(LoginRefused, match=r"refused user 'svc': nats: 'Authorization Violation'"):
                    await connect(settings, name="wrong")
        right = await connect(
            Settings.from_env({"NATS_URL": server.url, "NATS_USER": "svc", "NATS_PASSWORD": "right"}), "right"
        )
        assert right.is_connected
        await right.close()
    finally:
        server.stop()


async def test_slow_consumer_drops_are_counted_in_endpoint_stats(nc: Client) -> None:
    service = Service(nc, "tiny", "0.1.0")
    service.add_endpoint("tiny.slow", slow, concurrency_max=1, pending_msgs_max=2)
    async with service.serving():
        for _ in range(50):
            await nc.publish("tiny.slow", b'{"seconds": 0.05}')
        await nc.flush()
        await asyncio.sleep(0.2)
        stats = json.loads((await nc.request(f"$SRV.STATS.tiny.{service.id}", b"", timeout=2)).data)
    data = stats["endpoints"][0]["data"]
    assert data["slow_consumer_drops"] >= 40
    assert stats["endpoints"][0]["num_requests"] <= 10


def test_server_binary_is_the_wheels_not_the_one_on_path() -> None:
    binary = server_binary()
    assert binary.parent.parent == Path(__import__("sys").prefix)


def test_embedded_server_refuses_a_taken_port(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    with pytest.raises(PortTaken, match=f"127.0.0.1:{nats_server.port} is already in use"):
        EmbeddedNats(data_dir=tmp_path, port=nats_server.port).start()


def time_wait_on(port: int) -> bool:
    """A connection in TIME_WAIT (state 06 of /proc/net/tcp) whose local port is `port`."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(int(row.split()[1].split(":")[1], 16) == port and row.split()[3] == "06" for row in rows)


def test_embedded_server_starts_again_on_its_port_while_closed_connections_linger(tmp_path: Path) -> None:
    """A server that closed its clients' connections leaves them in TIME_WAIT on its port for a
    minute (a `nats sub` still attached when the mesh stops, or a crash); that port is free to
    listen on, so the mesh started again gets it back instead of moving to a random one."""
    server = EmbeddedNats(data_dir=tmp_path, port=free_port())
    server.start()
    with socket.create_connection((server.host, server.port)) as client:
        assert client.recv(4) == b"INFO"
        server.stop()  # the server closes first: its side of the connection lingers
        while client.recv(4096):
            pass
    assert time_wait_on(server.port), "the test needs a lingering connection on the port"
    assert port_is_free(server.host, server.port)
    server.start()
    server.stop()


def test_embedded_server_starts_with_jetstream_and_stops_cleanly(tmp_path: Path) -> None:
    server = EmbeddedNats(data_dir=tmp_path, port=free_port())
    url = server.start()

    async def jetstream_account_info() -> int:
        import nats

        nc = await nats.connect(url)
        info = await nc.jetstream().account_info()
        await nc.close()
        return info.limits.max_streams

    assert asyncio.run(jetstream_account_info()) != 0
    server.stop()
    assert server.process is not None and server.process.returncode == 0


def openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=30)


def certificate(directory: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A P-256 key and a certificate for `name` (an IP address names a server), signed by `ca`;
    without one, a self-signed CA."""
    pem, key = directory / f"{name}.pem", directory / f"{name}.key"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]
    if ca is None:
        openssl("req", "-x509", *new_key, "-subj", f"/CN={name}", "-days", "1", "-out", pem)
        return pem, key
    request, extensions = directory / f"{name}.csr", directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName=IP:{name}\n" if name[0].isdigit() else "basicConstraints=CA:FALSE\n")
    openssl("req", "-new", *new_key, "-subj", f"/CN={name}", "-out", request)
    ca_pem, ca_key = ca
    signing = ["-CA", ca_pem, "-CAkey", ca_key, "-CAcreateserial", "-days", "1", "-extfile", extensions]
    openssl("x509", "-req", "-in", request, *signing, "-out", pem)
    return pem, key


async def test_the_tls_settings_connect_to_a_server_that_verifies_both_sides(tmp_path: Path) -> None:
    """`NATS_TLS_CA`, `NATS_TLS_CERT` and `NATS_TLS_KEY` (README, Configuration) against a server
    that requires TLS and a client certificate signed by its CA."""
    ca = certificate(tmp_path, "ca")
    server_pem, server_key = certificate(tmp_path, "127.0.0.1", ca)
    client_pem, client_key = certificate(tmp_path, "mesh", ca)
    config = tmp_path / "tls.conf"
    config.write_text(
        f'tls {{cert_file: "{server_pem}", key_file: "{server_key}", ca_file: "{ca[0]}", verify: true}}\n'
        "jetstream {store_dir: $NATS_STORE_DIR}\n"
    )
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=free_port(), config=config)
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        environment = {"NATS_URL": url, "NATS_TLS_CA": str(ca[0])}
        certified = Settings.from_env(
            {**environment, "NATS_TLS_CERT": str(client_pem), "NATS_TLS_KEY": str(client_key)}
        )
        async with asyncio.timeout(10):  # `connect` retries forever
            nc = await connect(certified, name="test")
        try:
            service = Service(nc, "lookup", "0.1.0")
            service.add_endpoint("lookup.find", find)
            async with service.serving():
                assert await call(nc, "lookup.find", Key(1), Key) == Key(1)
        finally:
            await nc.close()
        for refused in (Settings.from_env(environment), Settings.from_env({"NATS_URL": url})):
            with pytest.raises((NoServersError, OSError)):  # no client certificate; then the server's CA unknown
                await nats.connect(url, tls=refused.tls_context(), allow_reconnect=False, connect_timeout=2)
    finally:
        server.stop()


def test_a_free_port_lies_below_the_ephemeral_range_and_takes_a_listener() -> None:
    """A port from `bind(0)` is an ephemeral one, which any outgoing connection may take as its
    source port before the server meant to listen on it starts."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        port = free_port()
        assert 1024 <= port < low
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()
