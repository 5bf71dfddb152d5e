"""A real nats-server from the wheel on a free loopback port for the whole test session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from bus.connection import Settings, connect
from bus.embedded import EmbeddedNats, free_port


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir=Path(tmp_path_factory.mktemp("nats")), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(Settings(servers=[nats_url]), name="test")
    yield client
    await client.close()
