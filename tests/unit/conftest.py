"""Unit tests start real relay ports (models.llm.relay.StreamServer); each is
stopped when its test ends, with the connections it still holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def _relay_ports_stop(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    from models.llm.relay import StreamServer

    started: list[StreamServer] = []
    start = StreamServer.start

    async def recorded(self: StreamServer) -> object:
        started.append(self)
        return await start(self)

    monkeypatch.setattr(StreamServer, "start", recorded)
    yield
    for server in started:
        await server.stop()
    await asyncio.sleep(0)  # the cancelled connections close their sockets
