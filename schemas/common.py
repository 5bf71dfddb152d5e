"""Types every message shares: contract bounds live in the type, checked once at the edge."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self

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
    after_id: NonNegative = 0


class Page(msgspec.Struct, frozen=True):
    """A page of a list (contract §1): `items`, and `next_after_<key>`, the `key` of its last item
    when more follow. A page may hold fewer than the `limit` asked for (`fitted`)."""

    key: ClassVar[str]
    items: list[Any]

    @classmethod
    def of(cls, found: list[Any], limit: int) -> Self:
        """A page of `limit` from up to `limit + 1` items read: the one more says a next page follows."""
        items = found[:limit]
        cursor = getattr(items[-1], cls.key) if len(found) > limit else None
        return cls(items=items, **{f"next_after_{cls.key}": cursor})

    def cut(self, count: int) -> Page:
        """Its first `count` items, with the cursor after the last of them: more follow."""
        assert 0 < count < len(self.items)
        head = self.items[:count]
        return msgspec.structs.replace(self, items=head, **{f"next_after_{self.key}": getattr(head[-1], self.key)})


class Deleted(msgspec.Struct, frozen=True):
    id: int
    deleted: bool = True
