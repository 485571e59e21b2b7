"""Tasks the ingress runs past the request that started them (reading what
an abandoned request generated, checking on a stalled call)."""

from __future__ import annotations

import asyncio
from typing import Any

_background: set[asyncio.Task[None]] = set()


def in_background(coro: Any) -> None:
    """Runs ``coro`` as a task that is kept referenced until it is done."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)  # keep a reference until it is done
    task.add_done_callback(_background.discard)
