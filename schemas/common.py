"""Types every message shares: contract bounds live in the type, checked once at the edge."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta
from sqlalchemy import BigInteger, Integer, MetaData

INT64_MAX = 2**63 - 1

Id = Annotated[int, Meta(gt=0, le=INT64_MAX)]
Cents = Annotated[int, Meta(gt=0, le=INT64_MAX)]
"""An amount or quantity: positive, within signed 64 bits."""
NonNegative = Annotated[int, Meta(ge=0, le=INT64_MAX)]
CURRENCY = "[A-Z]{3}"
Currency = Annotated[str, Meta(pattern=f"^{CURRENCY}\\Z")]
r"""Patterns end in `\Z`: msgspec tests them with Python's `re.search`, whose `$` also matches
before a final newline (`"EUR\n"` passed `^[A-Z]{3}$` and was stored)."""
NO_NUL = "^[^\x00]*\\Z"
"""Every free-text field that is stored: Postgres text cannot hold U+0000 (SQLite can), and on
Postgres one such value failed its whole batch with a 500. Refused with a 400 on both stores."""
Name = Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL)]
Limit = Annotated[int, Meta(ge=1, le=1000)]
LIMIT_DEFAULT = 50

metadata = MetaData()
"""All tables of all services, for the one alembic history; each service touches only its own."""

BigId = BigInteger().with_variant(Integer, "sqlite")
"""64-bit ids on Postgres; SQLite's INTEGER PRIMARY KEY is the 64-bit rowid."""


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every request: decoded once at the edge, strictly, unknown fields refused."""


class ById(Request):
    id: Id


class PageRequest(Request):
    limit: Limit = LIMIT_DEFAULT
    after_id: Annotated[int, Meta(ge=0)] = 0


class Deleted(msgspec.Struct, frozen=True):
    id: int
    deleted: bool = True
