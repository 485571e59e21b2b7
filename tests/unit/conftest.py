"""Unit tests start real relay ports (models.llm.relay.StreamServer); each is
stopped when its test ends, with the connections it still holds. The
ingress's side of those connections, kept idle in a relay's pool, is closed
then too: left to notice the port's close on its own, one could be collected
still open in a later test, whose teardown then failed on the warning."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
async def _relay_ports_stop(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    from gateway.http.relay_connection import ConnectionPool
    from models.llm.relay import StreamServer

    started: list[StreamServer] = []
    pools: list[ConnectionPool] = []
    start, make_pool = StreamServer.start, ConnectionPool.__init__

    async def recorded(self: StreamServer) -> object:
        started.append(self)
        return await start(self)

    def recorded_pool(self: ConnectionPool, *args: Any, **kwargs: Any) -> None:
        pools.append(self)
        make_pool(self, *args, **kwargs)

    monkeypatch.setattr(StreamServer, "start", recorded)
    monkeypatch.setattr(ConnectionPool, "__init__", recorded_pool)
    yield
    for pool in pools:
        pool.drop()
    for server in started:
        await server.stop()
    await asyncio.sleep(0)  # the cancelled connections close their sockets
