"""NATS Services API v1 (ADR-32) replies: what `nats micro ls|info|stats` reads."""

from __future__ import annotations

import msgspec

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"
VERBS = ("PING", "INFO", "STATS")


class Ping(msgspec.Struct, frozen=True):
    type: str
    name: str
    id: str
    version: str
    metadata: dict[str, str]


class EndpointInfo(msgspec.Struct, frozen=True):
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]


class Info(msgspec.Struct, frozen=True):
    type: str
    name: str
    id: str
    version: str
    metadata: dict[str, str]
    description: str
    endpoints: list[EndpointInfo]


class EndpointStats(msgspec.Struct, frozen=True):
    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str
    processing_time: int
    average_processing_time: int
    data: dict[str, int]


class Stats(msgspec.Struct, frozen=True):
    type: str
    name: str
    id: str
    version: str
    metadata: dict[str, str]
    started: str
    endpoints: list[EndpointStats]


def subjects(name: str, id: str) -> list[str]:
    """The nine subjects a service answers: every verb, bare, by name, and by name and id."""
    return [
        subject for verb in VERBS for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{name}", f"$SRV.{verb}.{name}.{id}")
    ]
