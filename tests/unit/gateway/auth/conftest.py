"""Fixtures of the key ledger's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.auth.limiter import LimiterClient
from gateway.auth.limiter_server import LimiterServer

Part = LimiterServer | LimiterClient


@pytest.fixture
async def parts() -> AsyncIterator[list[Part]]:
    """What a test starts, stopped when it ends however it ends: a client
    left open would be collected, unclosed, in whichever test runs next."""
    started: list[Part] = []
    yield started
    for part in reversed(started):
        await (part.close() if isinstance(part, LimiterClient) else part.stop())
