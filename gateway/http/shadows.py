"""Shadow copies of a route's requests (an alias's ``shadow``): sent in the
background to the shadow model, their answers discarded, the client's own
answer neither delayed nor changed. A copy is bounded by its model's
``request_timeout_s`` (``UNBOUNDED_S`` where it has none), and by its
model's bounded wait for a running replica; none is sent while ``MAX_OUT``
are still out, nor to an LLM this ingress already keeps half busy (copies
must not take the places its own clients get): copies to a slow or stopped
shadow model never pile up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from gateway.http.serving import LLMClient, ModelClient, ServedModel
from gateway.protocol.engine import EngineRequest

logger = logging.getLogger(__name__)

# Copies one ingress replica has out at most.
MAX_OUT = 64
# How long a copy to a model without ``request_timeout_s`` may take.
UNBOUNDED_S = 600.0


class Shadows:
    """The shadow copies one ingress replica has out."""

    def __init__(self, max_out: int = MAX_OUT) -> None:
        self._out: set[asyncio.Task[None]] = set()
        self._max_out = max_out
        self._full = False

    def __len__(self) -> int:
        return len(self._out)

    def send(self, model: ServedModel, call: EngineRequest) -> None:
        """Sends ``call`` to ``model`` in the background (unless too many are out)."""
        if len(self._out) >= self._max_out:
            if not self._full:  # (said once each time it fills)
                logger.warning("shadow copies to %s not sent: %d still out", call.model, self._max_out)
            self._full = True
            return
        self._full = False
        client = model.client
        if isinstance(client, LLMClient) and client.relay.half_full():
            logger.debug("shadow copy to %s not sent: its replicas are busy", call.model)
            return
        task = asyncio.create_task(_copy(model, call))
        self._out.add(task)  # keep a reference until it is done
        task.add_done_callback(self._out.discard)


async def _copy(model: ServedModel, call: EngineRequest) -> None:
    client = model.client
    try:
        async with asyncio.timeout(model.timeout_s if model.timeout_s is not None else UNBOUNDED_S):
            if call.stream and isinstance(client, LLMClient):
                stream = await client.relay.open(call)
                async for _ in stream.chunks():
                    pass
            else:
                await client.ready()  # (a classical model's wait for a running replica, bounded)
                await _answered(client, client.unary(call))
    except Exception as exc:  # noqa: BLE001 - a shadow's failure is only worth a log line
        # Quoted: a replica's message may repeat what the client sent (an unknown key's name), newlines included.
        kind = getattr(exc, "code", None) or type(exc).__name__
        logger.info("shadow request to %s failed: %s %r", call.model, kind, str(exc))


async def _answered(client: ModelClient, answer: Awaitable[Any]) -> None:
    """Waits for ``answer``, unless its model's replicas stop running first
    (``stalled``: Serve's router would hold the call until one runs again)."""
    stalled = client.stalled()
    if stalled is None:
        await answer
        return
    pending = asyncio.ensure_future(answer)
    try:
        await asyncio.wait({pending, stalled}, return_when=asyncio.FIRST_COMPLETED)
        if not pending.done():
            await stalled  # raises its 503
        pending.result()
    finally:
        pending.cancel()
        stalled.cancel()
