"""The service framework against a real nats-server: discovery, errors, decoding, stats, drain."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from typing import Annotated

import msgspec
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError

from bus.codec import EMPTY_BODY
from bus.errors import NotFound
from bus.service import Service

SEMVER = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
NAME = re.compile(r"^[a-zA-Z0-9_-]+$")


class Echo(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    text: Annotated[str, msgspec.Meta(max_length=16)]
    count: Annotated[int, msgspec.Meta(ge=1)]


class Inner(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    amount: Annotated[int, msgspec.Meta(gt=0)]


class Nested(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    items: list[Inner]


class Key(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: int


async def echo(request: Echo) -> Echo:
    return request


async def nested(request: Nested) -> Nested:
    return request


async def secret_failure(request: Key) -> Key:
    raise RuntimeError("password=hunter2 at /srv/db")


async def lookup(request: Key, known: set[int]) -> Key:
    if request.id not in known:
        raise NotFound(f"thing {request.id} not found")
    return request


def demo_service(nc: Client, name: str = "demo", **kwargs) -> Service:
    service = Service(nc, name=name, version="1.2.3", description="test service")
    service.add_endpoint(f"{name}.echo", echo, **kwargs)
    service.add_endpoint(f"{name}.nested", nested)
    service.add_endpoint(f"{name}.fail", secret_failure)
    service.add_endpoint(f"{name}.lookup", lookup, {1, 2})
    return service


async def request(nc: Client, subject: str, body: bytes) -> tuple[dict | None, dict]:
    msg = await nc.request(subject, body, timeout=2)
    return msg.headers, json.loads(msg.data)


async def test_echo_answers_with_the_decoded_struct(nc: Client) -> None:
    async with demo_service(nc).serving():
        headers, body = await request(nc, "demo.echo", b'{"text": "hi", "count": 2}')
    assert headers is None
    assert body == {"text": "hi", "count": 2}


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        (b"{not json", "$", "not valid JSON"),
        (b"", "$", "the body is empty"),
        (b" \r\n", "$", "the body is empty"),
        (b"[1]", "$", "Expected `object`"),
        (b'{"text": "hi"}', "$.count", "missing required field"),
        (b'{"text": "hi", "count": 1, "extra": 1}', "$.extra", "unknown field"),
        (b'{"text": 5, "count": 1}', "$.text", "Expected `str`"),
        (b'{"text": "hi", "count": "1"}', "$.count", "Expected `int`"),
        (b'{"text": "hi", "count": 1.0}', "$.count", "Expected `int`"),
        (b'{"text": "hi", "count": true}', "$.count", "Expected `int`"),
        (b'{"text": "hi", "count": 0}', "$.count", ">= 1"),
        (b'{"text": "12345678901234567", "count": 1}', "$.text", "length <= 16"),
    ],
)
async def test_strict_decoding_answers_400_naming_the_field(nc: Client, body: bytes, field: str, fragment: str) -> None:
    async with demo_service(nc).serving():
        headers, reply = await request(nc, "demo.echo", body)
    assert headers is not None
    assert headers["Nats-Service-Error-Code"] == "400"
    assert fragment in headers["Nats-Service-Error"]
    error = reply["error"]
    assert error["code"] == 400
    assert error["type"] == "bad_request"
    assert error["details"] == [field]
    assert fragment in error["message"]


async def test_nested_errors_name_the_path_inside_lists(nc: Client) -> None:
    async with demo_service(nc).serving():
        _, bad_value = await request(nc, "demo.nested", b'{"items": [{"amount": 1}, {"amount": 0}]}')
        _, missing = await request(nc, "demo.nested", b'{"items": [{}]}')
        _, unknown = await request(nc, "demo.nested", b'{"items": [{"amount": 1, "x": 2}]}')
    assert bad_value["error"]["details"] == ["$.items[1].amount"]
    assert missing["error"]["details"] == ["$.items[0].amount"]
    assert unknown["error"]["details"] == ["$.items[0].x"]


async def test_domain_error_carries_its_code_type_and_headers(nc: Client) -> None:
    async with demo_service(nc).serving():
        found_headers, found = await request(nc, "demo.lookup", b'{"id": 1}')
        headers, reply = await request(nc, "demo.lookup", b'{"id": 7}')
    assert found_headers is None and found == {"id": 1}
    assert headers == {"Nats-Service-Error": "thing 7 not found", "Nats-Service-Error-Code": "404"}
    assert reply == {"error": {"code": 404, "type": "not_found", "message": "thing 7 not found", "details": []}}


async def test_unexpected_exception_is_500_without_internals_and_service_keeps_serving(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    async with demo_service(nc).serving():
        headers, reply = await request(nc, "demo.fail", b'{"id": 1}')
        _, after = await request(nc, "demo.echo", b'{"text": "still", "count": 1}')
    assert headers is not None and headers["Nats-Service-Error-Code"] == "500"
    assert reply["error"]["type"] == "internal"
    assert "hunter2" not in json.dumps(reply) and "hunter2" not in headers["Nats-Service-Error"]
    assert "RuntimeError" not in json.dumps(reply)
    assert after == {"text": "still", "count": 1}
    failures = [record for record in caplog.records if record.exc_info]
    assert failures and "hunter2" in str(failures[0].exc_info[1])


async def test_discovery_ping_info_stats_follow_adr32(nc: Client) -> None:
    service = demo_service(nc)
    async with service.serving():
        await request(nc, "demo.echo", b'{"text": "a", "count": 1}')
        await request(nc, "demo.echo", b'{"text": "a"}')
        await request(nc, "demo.lookup", b'{"id": 9}')
        replies = {}
        for verb in ("PING", "INFO", "STATS"):
            for subject in (f"$SRV.{verb}.demo", f"$SRV.{verb}.demo.{service.id}"):
                headers, replies[subject] = await request(nc, subject, b"")
                assert headers is None
    ping = replies[f"$SRV.PING.demo.{service.id}"]
    assert ping == {
        "type": "io.nats.micro.v1.ping_response",
        "name": "demo",
        "id": service.id,
        "version": "1.2.3",
        "metadata": {},
    }
    assert SEMVER.match(ping["version"]) and NAME.match(ping["name"])
    info = replies[f"$SRV.INFO.demo.{service.id}"]
    assert list(info) == ["type", "name", "id", "version", "metadata", "description", "endpoints"]
    assert info["type"] == "io.nats.micro.v1.info_response"
    assert info["description"] == "test service"
    assert info["endpoints"][0] == {
        "name": "echo",
        "subject": "demo.echo",
        "queue_group": "q",
        "metadata": {},
    }
    assert all(NAME.match(endpoint["name"]) for endpoint in info["endpoints"])
    stats = replies[f"$SRV.STATS.demo.{service.id}"]
    assert list(stats) == ["type", "name", "id", "version", "metadata", "started", "endpoints"]
    assert stats["type"] == "io.nats.micro.v1.stats_response"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stats["started"])
    datetime.fromisoformat(stats["started"].replace("Z", "+00:00"))
    by_name = {endpoint["name"]: endpoint for endpoint in stats["endpoints"]}
    assert by_name["echo"]["num_requests"] == 2
    assert by_name["echo"]["num_errors"] == 1
    assert by_name["echo"]["last_error"].startswith("400:")
    assert by_name["lookup"]["last_error"] == "404:thing 9 not found"
    assert by_name["nested"] == {
        "name": "nested",
        "subject": "demo.nested",
        "queue_group": "q",
        "num_requests": 0,
        "num_errors": 0,
        "last_error": "",
        "processing_time": 0,
        "average_processing_time": 0,
        "data": {"slow_consumer_drops": 0, "concurrency_max": 256},
    }
    echo_stats = by_name["echo"]
    assert isinstance(echo_stats["processing_time"], int) and echo_stats["processing_time"] > 0
    assert echo_stats["average_processing_time"] == echo_stats["processing_time"] // 2


async def test_bare_discovery_subject_reaches_every_service(nc: Client) -> None:
    first, second = demo_service(nc, "alpha"), demo_service(nc, "beta")
    async with first.serving(), second.serving():
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        names = set()
        for _ in range(2):
            names.add(json.loads((await sub.next_msg(timeout=2)).data)["name"])
        await sub.unsubscribe()
    assert names == {"alpha", "beta"}


class Sleep(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    seconds: float


def counting_sleeper() -> tuple[object, dict[str, int]]:
    state = {"in_flight": 0, "peak": 0, "done": 0}

    async def sleep(request: Sleep) -> Sleep:
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            await asyncio.sleep(request.seconds)
        finally:
            state["in_flight"] -= 1
        state["done"] += 1
        return request

    return sleep, state


async def test_concurrency_is_bounded_per_endpoint_and_requests_wait_their_turn(nc: Client) -> None:
    sleep, state = counting_sleeper()
    service = Service(nc, name="sleepy", version="0.1.0")
    service.add_endpoint("sleepy.sleep", sleep, concurrency_max=4)
    async with service.serving():
        started = asyncio.get_running_loop().time()
        replies = await asyncio.gather(*(nc.request("sleepy.sleep", b'{"seconds": 0.2}', timeout=5) for _ in range(12)))
        elapsed = asyncio.get_running_loop().time() - started
    assert all(reply.headers is None for reply in replies)
    assert state["peak"] == 4
    assert 0.6 <= elapsed < 1.5  # three waves of four


async def test_requests_run_concurrently_up_to_the_bound(nc: Client) -> None:
    sleep, state = counting_sleeper()
    service = Service(nc, name="wide", version="0.1.0")
    service.add_endpoint("wide.sleep", sleep, concurrency_max=64)
    async with service.serving():
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(nc.request("wide.sleep", b'{"seconds": 0.3}', timeout=5) for _ in range(50)))
        elapsed = asyncio.get_running_loop().time() - started
    assert state["peak"] == 50
    assert elapsed < 0.9


async def test_drain_finishes_every_request_in_flight_and_takes_no_new_ones(nc: Client, nats_url: str) -> None:
    sleep, state = counting_sleeper()
    service = Service(nc, name="drainy", version="0.1.0")
    service.add_endpoint("drainy.sleep", sleep, concurrency_max=8)
    async with service.serving():
        pending = [asyncio.ensure_future(nc.request("drainy.sleep", b'{"seconds": 0.3}', timeout=5)) for _ in range(20)]
        await asyncio.sleep(0.1)  # eight in flight, twelve waiting in the subscription
        assert state["in_flight"] == 8
    # leaving the block drained: everything received was answered
    replies = await asyncio.gather(*pending)
    assert state["done"] == 20
    assert all(reply.headers is None for reply in replies)
    with pytest.raises(NoRespondersError):
        await nc.request("drainy.sleep", b'{"seconds": 0}', timeout=1)


async def test_a_batch_endpoint_answers_each_request_of_a_batch_on_its_own(nc: Client) -> None:
    batches: list[int] = []

    async def lookup_each(requests: list[Key], known: set[int]) -> list[Key | NotFound]:
        batches.append(len(requests))
        if any(r.id == 666 for r in requests):
            raise RuntimeError("secret")
        return [r if r.id in known else NotFound(f"thing {r.id} not found") for r in requests]

    service = Service(nc, name="bulk", version="1.0.0")
    service.add_batch_endpoint("bulk.lookup", lookup_each, {1, 2}, request_type=Key, batch_max=64)
    async with service.serving():
        bodies = [json.dumps({"id": n % 4}).encode() for n in range(200)] + [b'{"id": "x"}', b""]
        replies = await asyncio.gather(*(request(nc, "bulk.lookup", body) for body in bodies))
        assert max(batches) > 1 and all(size <= 64 for size in batches)  # batched, and bounded
        for n, (headers, body) in enumerate(replies[:200]):
            if n % 4 in (1, 2):
                assert headers is None and body == {"id": n % 4}
            else:
                assert headers["Nats-Service-Error-Code"] == "404" and body["error"]["type"] == "not_found"
        headers, body = replies[200]
        assert headers["Nats-Service-Error-Code"] == "400" and body["error"]["details"] == ["$.id"]
        headers, body = replies[201]
        assert headers["Nats-Service-Error-Code"] == "400" and body["error"]["message"] == EMPTY_BODY
        headers, body = await request(nc, "bulk.lookup", b'{"id": 666}')
        assert headers["Nats-Service-Error-Code"] == "500" and "secret" not in json.dumps(body)
        stats = json.loads((await nc.request("$SRV.STATS.bulk", b"", timeout=2)).data)
    (endpoint,) = stats["endpoints"]
    assert endpoint["num_requests"] == 203 and endpoint["num_errors"] == 3 + 100
