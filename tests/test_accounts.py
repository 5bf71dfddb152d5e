"""`accounts.users.*` as the contract writes them, on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from tests.conftest import Mesh

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
USER_FIELDS = ["id", "email", "name", "inserted_at", "updated_at"]


def alice(**overrides: object) -> dict:
    return {"email": "Alice@Example.COM", "name": "Alice", "password": "correct horse", **overrides}


async def test_create_returns_the_user_with_email_lower_cased_and_no_password(mesh: Mesh) -> None:
    user = await mesh.ok("accounts.users.create", alice())
    assert list(user) == USER_FIELDS
    assert user["id"] >= 1
    assert user["email"] == "alice@example.com"
    assert user["name"] == "Alice"
    assert TIMESTAMP.match(user["inserted_at"]) and user["inserted_at"] == user["updated_at"]
    assert await mesh.ok("accounts.users.get", {"id": user["id"]}) == user


async def test_get_of_unknown_id_is_404(mesh: Mesh) -> None:
    code, reply = await mesh.request("accounts.users.get", {"id": 424242})
    assert code == 404
    assert reply["error"]["type"] == "not_found"


async def test_email_is_unique_whatever_its_case(mesh: Mesh) -> None:
    await mesh.ok("accounts.users.create", alice())
    code, reply = await mesh.request("accounts.users.create", alice(email="ALICE@example.com", name="Other"))
    assert code == 409
    assert reply["error"]["type"] == "email_taken"


async def test_many_concurrent_creates_of_one_email_exactly_one_wins(mesh: Mesh) -> None:
    results = await asyncio.gather(
        *(mesh.request("accounts.users.create", alice(name=f"racer {n}")) for n in range(12))
    )
    codes = sorted(str(code) for code, _ in results)
    assert codes == ["409"] * 11 + ["None"]
    page = await mesh.ok("accounts.users.list", {})
    assert len(page["items"]) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (alice(email="no-at-sign"), "$.email"),
        (alice(email="two@@example.com"), "$.email"),
        (alice(email="a@b@example.com"), "$.email"),
        (alice(email="with space@example.com"), "$.email"),
        (alice(email="a@" + "b" * 253), "$.email"),
        (alice(name=""), "$.name"),
        (alice(name="n" * 256), "$.name"),
        (alice(password="short77"), "$.password"),
        (alice(password="p" * 257), "$.password"),
        (alice(admin=True), "$.admin"),
        ({"email": "a@b.c", "name": "A"}, "$.password"),
        (alice(name=5), "$.name"),
    ],
)
async def test_invalid_create_is_400_naming_the_field_and_records_nothing(mesh: Mesh, body: dict, field: str) -> None:
    code, reply = await mesh.request("accounts.users.create", body)
    assert code == 400
    assert reply["error"]["details"] == [field]
    assert (await mesh.ok("accounts.users.list", {}))["items"] == []


async def test_boundary_lengths_are_accepted(mesh: Mesh) -> None:
    email = "a" * 64 + "@" + "b" * 189
    assert len(email) == 254
    user = await mesh.ok("accounts.users.create", alice(email=email, name="n" * 255, password="p" * 8))
    assert user["email"] == email and len(user["name"]) == 255
    await mesh.ok("accounts.users.create", alice(email="x@y", name="n", password="p" * 256))


async def test_list_pages_by_ascending_id_with_a_cursor_null_on_the_last_page(mesh: Mesh) -> None:
    ids = [(await mesh.ok("accounts.users.create", alice(email=f"u{n}@x.io")))["id"] for n in range(5)]
    first = await mesh.ok("accounts.users.list", {"limit": 2})
    second = await mesh.ok("accounts.users.list", {"limit": 2, "after_id": first["next_after_id"]})
    third = await mesh.ok("accounts.users.list", {"limit": 2, "after_id": second["next_after_id"]})
    assert [u["id"] for u in first["items"] + second["items"] + third["items"]] == ids
    assert first["next_after_id"] == ids[1] and second["next_after_id"] == ids[3]
    assert third["next_after_id"] is None
    exact = await mesh.ok("accounts.users.list", {"limit": 5})
    assert len(exact["items"]) == 5 and exact["next_after_id"] is None
    assert (await mesh.ok("accounts.users.list", {}))["items"][0]["id"] == ids[0]
    for bad in ({"limit": 0}, {"limit": 1001}, {"after_id": -1}, {"limit": "5"}):
        code, _ = await mesh.request("accounts.users.list", bad)
        assert code == 400, bad
    pages = [(after, limit) for after in [0, *ids, ids[-1] + 1] for limit in (1, 2, 5)] * 2
    answers = await asyncio.gather(
        *(mesh.ok("accounts.users.list", {"after_id": after, "limit": limit}) for after, limit in pages)
    )
    for (after, limit), answer in zip(pages, answers, strict=True):  # asked together: one statement
        rest = [n for n in ids if n > after]
        assert [u["id"] for u in answer["items"]] == rest[:limit], (after, limit)
        assert answer["next_after_id"] == (rest[limit - 1] if len(rest) > limit else None)


async def test_update_changes_fields_and_keeps_the_rest(mesh: Mesh) -> None:
    user = await mesh.ok("accounts.users.create", alice())
    await asyncio.sleep(0.002)
    updated = await mesh.ok("accounts.users.update", {"id": user["id"], "name": "Alice B"})
    assert updated["name"] == "Alice B" and updated["email"] == user["email"]
    assert updated["inserted_at"] == user["inserted_at"] and updated["updated_at"] > user["updated_at"]
    moved = await mesh.ok("accounts.users.update", {"id": user["id"], "email": "NEW@x.io"})
    assert moved["email"] == "new@x.io"


async def test_update_to_a_taken_email_is_409_and_of_unknown_id_404(mesh: Mesh) -> None:
    first = await mesh.ok("accounts.users.create", alice())
    await mesh.ok("accounts.users.create", alice(email="bob@x.io"))
    code, reply = await mesh.request("accounts.users.update", {"id": first["id"], "email": "BOB@x.io"})
    assert code == 409 and reply["error"]["type"] == "email_taken"
    assert (await mesh.ok("accounts.users.get", {"id": first["id"]}))["email"] == "alice@example.com"
    code, _ = await mesh.request("accounts.users.update", {"id": 999, "name": "x"})
    assert code == 404
    code, reply = await mesh.request("accounts.users.update", {"id": first["id"], "name": None})
    assert code == 400 and reply["error"]["details"] == ["$.name"]


async def test_password_update_changes_what_authenticates(mesh: Mesh) -> None:
    user = await mesh.ok("accounts.users.create", alice())
    await mesh.ok("accounts.users.update", {"id": user["id"], "password": "new password"})
    code, _ = await mesh.request(
        "accounts.users.authenticate", {"email": "alice@example.com", "password": "correct horse"}
    )
    assert code == 401
    assert await mesh.ok("accounts.users.authenticate", {"email": "ALICE@example.com", "password": "new password"})


async def test_delete_answers_deleted_then_404(mesh: Mesh) -> None:
    user = await mesh.ok("accounts.users.create", alice())
    assert await mesh.ok("accounts.users.delete", {"id": user["id"]}) == {"id": user["id"], "deleted": True}
    assert (await mesh.request("accounts.users.get", {"id": user["id"]}))[0] == 404
    assert (await mesh.request("accounts.users.delete", {"id": user["id"]}))[0] == 404
    again = await mesh.ok("accounts.users.create", alice())
    assert again["id"] > user["id"]  # ids are never reused


async def test_authenticate_says_401_alike_for_wrong_password_and_unknown_email(mesh: Mesh) -> None:
    user = await mesh.ok("accounts.users.create", alice())
    assert (
        await mesh.ok("accounts.users.authenticate", {"email": "alice@example.com", "password": "correct horse"})
        == user
    )
    timings, replies = [], []
    for email in ("alice@example.com", "nobody@example.com"):
        started = time.perf_counter()
        code, reply = await mesh.request("accounts.users.authenticate", {"email": email, "password": "wrong pass"})
        timings.append(time.perf_counter() - started)
        assert code == 401
        replies.append(reply)
    assert replies[0] == replies[1]
    assert replies[0]["error"]["type"] == "invalid_credentials"
    assert timings[1] > 0.5 * timings[0]  # an unknown email costs a full hash too


async def test_each_change_publishes_one_event_with_its_id_as_msg_id_and_no_secret(mesh: Mesh) -> None:
    user = await mesh.ok("accounts.users.create", alice())
    updated = await mesh.ok("accounts.users.update", {"id": user["id"], "password": "other secret", "name": "B"})
    await mesh.ok("accounts.users.delete", {"id": user["id"]})
    events = await mesh.events(3)
    assert [subject for subject, _, _ in events] == [
        "events.accounts.user.created",
        "events.accounts.user.updated",
        "events.accounts.user.deleted",
    ]
    for subject, msg_id, envelope in events:
        assert list(envelope) == ["id", "type", "source", "occurred_at", "data"]
        assert msg_id == envelope["id"]
        assert envelope["type"] == subject.removeprefix("events.")
        assert envelope["source"] == "accounts"
        assert TIMESTAMP.match(envelope["occurred_at"])
        text = json.dumps(envelope)
        assert "password" not in text and "scrypt" not in text and "secret" not in text
    assert events[0][2]["data"] == user
    assert events[1][2]["data"] == updated
    assert events[2][2]["data"]["id"] == user["id"]
    await asyncio.sleep(0.3)
    assert await mesh.event_count() == 3
