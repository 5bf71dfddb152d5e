"""Messages and tables of the accounts service (contract §4, `accounts.users.*`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType
from sqlalchemy import Column, String, Table

from schemas.common import BigId, ById, Id, Name, Page, PageRequest, Request, metadata
from schemas.database import UtcDateTime
from schemas.events import outbox_table

Email = Annotated[str, Meta(max_length=254, pattern=r"^[^@\s\x00]+@[^@\s\x00]+\Z")]
Password = Annotated[str, Meta(min_length=8, max_length=256)]

users = Table(
    "users",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("inserted_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    sqlite_autoincrement=True,  # never reuse the id of a deleted user
)
accounts_outbox = outbox_table("accounts")


class CreateUser(Request):
    email: Email
    name: Name
    password: Password


UserId = ById
ListUsers = PageRequest


class UpdateUser(Request):
    id: Id
    email: Email | UnsetType = UNSET
    name: Name | UnsetType = UNSET
    password: Password | UnsetType = UNSET


class Authenticate(Request):
    email: Annotated[str, Meta(max_length=254)]
    password: Annotated[str, Meta(max_length=256)]


class User(msgspec.Struct, frozen=True):
    id: int
    email: str
    name: str
    inserted_at: str
    updated_at: str


class UserPage(Page, frozen=True):
    key = "id"
    items: list[User]
    next_after_id: int | None
