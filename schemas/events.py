"""The event envelope (contract §6) and the outbox table each service keeps for its events."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import Column, LargeBinary, String, Table

from schemas.common import BigId, metadata
from schemas.database import UtcDateTime


class Envelope(msgspec.Struct, frozen=True):
    id: str
    type: str
    source: str
    occurred_at: str
    data: Any


def outbox_table(service: str) -> Table:
    """Events committed with the change they describe, published by the relay, then deleted."""
    return Table(
        f"{service}_outbox",
        metadata,
        Column("seq", BigId, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("subject", String(255), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )
