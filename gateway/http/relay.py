"""Streams from LLM replicas, relayed byte for byte (``gateway.protocol.relay``).

Serve's router still decides which replica serves a stream and holds a slot on
it for the stream's whole life (``choose_replica``), so ``max_ongoing_requests``,
``max_queued_requests`` (BackPressureError), autoscaling and draining count
relayed streams exactly as handle calls. The tokens then come straight from
the replica's own port: one read, one write to the client, however many
tokens a read holds; nothing is parsed per token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from gateway.errors import GatewayError, ServiceUnavailableError
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome

READ_BYTES = 64 * 1024
# Replicas tried before a stream is answered 503: one that has just died may
# still be chosen until Serve's routers learn it is gone.
ATTEMPTS = 3
_UNAVAILABLE = "The model is temporarily unavailable; please retry shortly."


class StreamCutError(ConnectionError):
    """The replica's stream ended without its end mark: the replica failed mid-stream."""


class RelayedStream:
    """One stream being relayed; ``chunks()`` once, then ``outcome`` is set."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        slot: AbstractAsyncContextManager[Any],
        releases: set[asyncio.Task[Any]],
    ) -> None:
        self._reader, self._writer, self._slot, self._releases = reader, writer, slot, releases
        self.outcome: Outcome | None = None
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yields the stream's bytes as they arrive; raises ``StreamCutError``
        when the replica's stream breaks off. Leaving early closes the
        connection, which aborts the engine request."""
        reader = self._reader
        try:
            while data := await reader.read(READ_BYTES):
                end = data.find(relay.END)
                if end < 0:
                    yield data
                    continue
                if end:
                    yield data[:end]
                self.outcome = relay.decode_outcome(data[end + 1 :] + await reader.read())
                return
            raise StreamCutError("the replica closed the stream before its end")
        except OSError as exc:
            raise StreamCutError(str(exc)) from exc
        finally:
            self.close()

    def close(self) -> None:
        """Closes the connection and gives the replica's slot back. Never awaits:
        it runs where the client's hang-up cancels every await."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        _release(self._slot, self._releases)


class StreamRelay:
    """Opens streams of one model on the replicas Serve's router picks."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._releases: set[asyncio.Task[Any]] = set()

    async def open(self, call: EngineRequest) -> RelayedStream:
        """Connects to a replica and waits for its answer to start.

        Raises ``GatewayError`` for errors known before the first byte (the
        replica's own, or 503 when no replica could be reached) and Serve's
        errors (BackPressureError, DeploymentUnavailableError) as they come.
        """
        for _ in range(ATTEMPTS):
            slot = self._handle.choose_replica()
            selection = await slot.__aenter__()
            try:
                return await self._start(call, selection, slot)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                continue  # that replica is gone: its slot went back in _start
        raise ServiceUnavailableError(_UNAVAILABLE)

    async def _start(
        self, call: EngineRequest, selection: Any, slot: AbstractAsyncContextManager[Any]
    ) -> RelayedStream:
        writer: asyncio.StreamWriter | None = None
        try:
            address = relay.RelayAddress.from_metadata(selection.replica_metadata)
            if address is None:
                raise ServiceUnavailableError(_UNAVAILABLE)  # a replica of an older gateway
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(relay.encode_request(call, address.token))
            status, length = relay.status_of(await reader.readuntil(b"\r\n\r\n"))
            if status != 200:
                raise GatewayError.from_wire(json.loads(await reader.readexactly(length or 0)))
        except BaseException:
            if writer is not None:
                writer.close()
            _release(slot, self._releases)
            raise
        return RelayedStream(reader, writer, slot, self._releases)


def _release(slot: AbstractAsyncContextManager[Any], releases: set[asyncio.Task[Any]]) -> None:
    """Gives a reserved slot back in a task of its own, so that a cancelled
    caller cannot leave it held."""
    task = asyncio.get_running_loop().create_task(slot.__aexit__(None, None, None))
    releases.add(task)
    task.add_done_callback(releases.discard)
