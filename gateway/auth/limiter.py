"""The one ledger every ingress replica shares, reached over a socket.

``LimiterServer`` runs in the gateway's one shared replica (the metrics hub)
and serves a ``Ledger`` on a port guarded by a random token, published as
Serve replica metadata (key ``limiter``). Each ingress replica keeps one
connection to it (``LimiterClient``): a reservation is one JSON line each
way, a settlement one line out, so admission costs a loopback round trip,
not a Serve call.

Reservations belong to the connection that made them: when an ingress
replica goes away unsettled reservations end there, keeping the tokens they
reserved (the conservative count), so nothing is left in flight forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from gateway.auth.ledger import Decision, Ledger, Limits, Refusal, Usage
from gateway.errors import ServiceUnavailableError
from gateway.protocol.relay import RelayAddress

logger = logging.getLogger(__name__)

METADATA_KEY = "limiter"
CONNECT_TIMEOUT_S = 2.0
READ_BYTES = 256 * 1024
REPLY_TIMEOUT_S = 2.0
UNAVAILABLE = "Rate limits cannot be checked right now; please retry shortly."


class LimiterAddress(RelayAddress):
    """Where the ledger listens, and the token it asks for."""

    @classmethod
    def metadata_key(cls) -> str:
        return METADATA_KEY


def _limits(data: list[int | None]) -> Limits:
    return Limits(*data)


def _encode_decision(decision: Decision) -> dict[str, Any]:
    refusal = decision.refusal
    return {
        "r": decision.reservation,
        "usage": list(decision.usage.__dict__.values()),
        "refusal": list(refusal.__dict__.values()) if refusal is not None else None,
    }


def _decode_decision(data: dict[str, Any]) -> Decision:
    refusal = data.get("refusal")
    return Decision(
        data.get("r"), Usage(*data["usage"]), Refusal(*refusal) if refusal is not None else None
    )


class LimiterServer:
    """Serves ``ledger`` to callers that know the token."""

    def __init__(self, host: str, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self._host = host
        self._token = secrets.token_urlsafe(32)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> LimiterAddress:
        self._server = await asyncio.start_server(self._connection, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return LimiterAddress(self._host, int(port), self._token)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        owned: set[int] = set()
        try:
            hello = await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT_S)
            token = str(json.loads(hello or b"{}").get("token", ""))
            if not hmac.compare_digest(token.encode(), self._token.encode()):
                return
            pending = b""
            while data := await reader.read(READ_BYTES):
                # Whatever arrived together is answered together: one write.
                *lines, pending = (pending + data).split(b"\n")
                replies = [self._serve(json.loads(line), owned) for line in lines if line]
                out = [json.dumps(r, separators=(",", ":")).encode() for r in replies if r is not None]
                if out:
                    writer.write(b"\n".join(out) + b"\n")
        except (ConnectionError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            for reservation in owned:  # the caller is gone: keep what was reserved
                self.ledger.settle(reservation, None)
            writer.close()

    def _serve(self, message: dict[str, Any], owned: set[int]) -> dict[str, Any] | None:
        op = message.get("op")
        if op == "settle":
            owned.discard(message["r"])
            self.ledger.settle(message["r"], int(message["used"]))
            return None
        if op == "reserve":
            decision = self.ledger.reserve(
                str(message["key"]), _limits(message["limits"]), int(message["tokens"])
            )
            if decision.reservation is not None:
                owned.add(decision.reservation)
            return {"id": message["id"], **_encode_decision(decision)}
        if op == "usage":
            usage = self.ledger.usage(str(message["key"]), _limits(message["limits"]))
            return {"id": message["id"], "usage": list(usage.__dict__.values()),
                    "in_flight": self.ledger.in_flight(str(message["key"]))}
        return {"id": message.get("id"), "error": f"unknown op {op!r}"}


class LocalLimiter:
    """A ledger in this process, behind ``LimiterClient``'s methods: for a
    gateway of one process (tests, tools)."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()

    async def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        return self.ledger.reserve(key, limits, tokens)

    async def usage(self, key: str, limits: Limits) -> tuple[Usage, int]:
        return self.ledger.usage(key, limits), self.ledger.in_flight(key)

    def settle(self, reservation: int, used_tokens: int) -> None:
        self.ledger.settle(reservation, used_tokens)

    async def close(self) -> None:
        pass


class LimiterClient:
    """One ingress replica's connection to the shared ledger.

    ``find`` returns the server's address (Serve replica metadata). Calls
    raise ``ServiceUnavailableError`` (503) when the ledger cannot be
    reached: a limited key is never let through unchecked.
    """

    def __init__(self, find: Callable[[], Any]) -> None:
        self._find = find
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()
        self._outbox: list[bytes] = []

    async def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        reply = await self._ask({"op": "reserve", "key": key, "limits": list(limits.__dict__.values()),
                                 "tokens": tokens})
        return _decode_decision(reply)

    async def usage(self, key: str, limits: Limits) -> tuple[Usage, int]:
        """The key's counts now, and its requests in flight."""
        reply = await self._ask({"op": "usage", "key": key, "limits": list(limits.__dict__.values())})
        return Usage(*reply["usage"]), int(reply["in_flight"])

    def settle(self, reservation: int, used_tokens: int | None) -> None:
        """Never waits; on a broken connection the server has already ended
        the reservation (keeping its tokens)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        self._send({"op": "settle", "r": reservation, "used": used_tokens})

    def _send(self, message: dict[str, Any]) -> None:
        """Queues ``message``; what is queued in one turn of the event loop
        leaves in one write (under load, many requests share it)."""
        self._outbox.append(json.dumps(message, separators=(",", ":")).encode())
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        lines, self._outbox = self._outbox, []
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(b"\n".join(lines) + b"\n")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        await self._connection()
        message["id"] = ident = next(self._ids)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = reply
        try:
            self._send(message)
            return await asyncio.wait_for(reply, REPLY_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            raise ServiceUnavailableError(UNAVAILABLE) from None
        finally:
            self._pending.pop(ident, None)

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                address = await self._find()
                if address is None:
                    raise ConnectionError("no limiter address")
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address.host, address.port), CONNECT_TIMEOUT_S
                )
            except (OSError, asyncio.TimeoutError) as exc:
                logger.warning("cannot reach the rate limiter: %s", exc)
                raise ServiceUnavailableError(UNAVAILABLE) from None
            writer.write(json.dumps({"token": address.token}).encode() + b"\n")
            self._writer = writer
            self._reading = asyncio.get_running_loop().create_task(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pending = b""
            while data := await reader.read(READ_BYTES):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    reply = json.loads(line)
                    waiting = self._pending.get(reply.get("id"))
                    if waiting is not None and not waiting.done():
                        waiting.set_result(reply)
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(ConnectionError("the rate limiter went away"))
