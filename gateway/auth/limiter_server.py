"""The ledger's side of ``gateway.auth.limiter``: ``LimiterServer`` serves a
``Ledger`` on a port guarded by a random token, in the gateway's one shared
replica (the metrics hub); each ingress replica's ``LimiterClient`` keeps one
connection to it (``_Peer`` here)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from typing import Any

from gateway.auth.ledger import Ledger, Limits
from gateway.auth.places import PlaceWaits
from gateway.auth.limiter_wire import (
    CONNECT_TIMEOUT_S,
    READ_BYTES,
    RECALL_WAIT_S,
    RESTORE_GRACE_S,
    LimiterAddress,
    encode_decision,
    limits_of,
)
from gateway.protocol import port_proof
from gateway.protocol.peer import PeerWriter

logger = logging.getLogger(__name__)


class _Peer:
    """One ingress replica's connection, and what it holds in the ledger."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.owned: set[int] = set()  # reservations and leases not yet ended
        self.leases: dict[int, str] = {}  # leases it may still admit from, and their keys
        self.restored: dict[int, int] = {}  # its tickets booked by ``restore``, and their reservations

    def own(self, message: dict[str, Any], end: bool = False) -> int | None:
        """The reservation ``message`` names, when it is this replica's (None:
        one of a ledger before this one, or of someone else: ignored)."""
        if "t" in message:
            ticket = int(message["t"])
            return self.restored.pop(ticket, None) if end else self.restored.get(ticket)
        reservation = message.get("r")
        return reservation if reservation in self.owned else None

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class LimiterServer:
    """Serves ``ledger`` to callers that know the token.

    A request the ledger would refuse while other replicas hold leases of
    its key waits (at most ``RECALL_WAIT_S``): the holders are asked to give
    back what they have not used, and it is decided again on each return, so
    a request that fits the key's real use is never refused. One refused for
    the key's concurrency limit alone waits a moment for a place
    (``gateway.auth.places``).

    A ledger that replaces one (a replica says it was connected before)
    decides nothing for ``RESTORE_GRACE_S`` from then: the other replicas
    reach it meanwhile and book what they have in flight
    (``gateway.auth.tickets``), before the requests that waited for it are
    weighed against their keys' limits.
    """

    def __init__(self, host: str, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self._host = host
        self._token = secrets.token_urlsafe(32)
        self._server: asyncio.base_events.Server | None = None
        self._leases: dict[str, dict[int, _Peer]] = {}  # key -> open leases and their holders
        self._parked: dict[str, list[tuple[_Peer, dict[str, Any]]]] = {}
        self._recalls: dict[str, asyncio.TimerHandle] = {}
        self._peers: set[_Peer] = set()
        self._waits = PlaceWaits()
        self._waiting: set[asyncio.Task[None]] = set()
        self._grace: list[tuple[_Peer, dict[str, Any]]] | None = None  # held back while replicas restore
        self._graced = False

    async def start(self) -> LimiterAddress:
        self._server = await asyncio.start_server(self._connection, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return LimiterAddress(self._host, int(port), self._token)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.writer.close()
        for task in list(self._waiting):
            task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer = PeerWriter.over(reader, writer)
        peer = _Peer(writer)
        self._peers.add(peer)
        try:
            if not await port_proof.prove(reader, writer, self._token, CONNECT_TIMEOUT_S):
                return
            hello = json.loads(await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT_S) or b"{}")
            if not isinstance(hello, dict) or not hmac.compare_digest(
                str(hello.get("token", "")).encode(), self._token.encode()
            ):
                return
            if hello.get("again"):
                self._hold_back()
            pending = b""
            while data := await reader.read(READ_BYTES):
                # Whatever arrived together is answered together: one write.
                *lines, pending = (pending + data).split(b"\n")
                replies = [self._serve(json.loads(line), peer) for line in lines if line]
                out = [json.dumps(r, separators=(",", ":")).encode() for r in replies if r is not None]
                if out:
                    writer.write(b"\n".join(out) + b"\n")
        except (ConnectionError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            self._peers.discard(peer)
            self._gone(peer)
            writer.close()

    def _gone(self, peer: _Peer) -> None:
        """The caller is gone: its reservations and leases end, keeping what
        they counted, and requests waiting on its leases are decided."""
        for reservation in peer.owned:
            self._waits.freed(self.ledger.settle(reservation, None))
        for reservation, key in peer.leases.items():
            self._leases.get(key, {}).pop(reservation, None)
        for parked in self._parked.values():
            parked[:] = [(p, m) for p, m in parked if p is not peer]
        for key in set(peer.leases.values()):
            self._retry(key)

    def _hold_back(self) -> None:
        """Starts the grace in which what is in flight is restored (once)."""
        if self._graced:
            return
        self._graced = True
        self._grace = []
        asyncio.get_running_loop().call_later(RESTORE_GRACE_S, self._end_grace)

    def _end_grace(self) -> None:
        held, self._grace = self._grace or [], None
        for peer, message in held:
            if peer in self._peers:
                reply = self._serve(message, peer)
                if reply is not None:
                    peer.send(reply)

    def _serve(self, message: dict[str, Any], peer: _Peer) -> dict[str, Any] | None:
        op = message.get("op")
        if self._grace is not None and op in ("reserve", "lease"):
            self._grace.append((peer, message))
            return None
        if op == "settle":
            reservation = peer.own(message, end=True)
            if reservation is not None:
                peer.owned.discard(reservation)
                used = message["used"]
                self._returned(self.ledger.settle(reservation, None if used is None else int(used)))
            return None
        if op == "leave":
            reservation = peer.own(message)
            if reservation is not None:
                self._returned(self.ledger.leave(reservation))
            return None
        if op == "restore":
            for ticket, key, tokens, left in message["held"]:
                reservation = self.ledger.hold(str(key), int(tokens), bool(left))
                peer.owned.add(reservation)
                peer.restored[int(ticket)] = reservation
            for key, age_s, requests, tokens in message.get("window", ()):
                self.ledger.recount(str(key), float(age_s), int(requests), int(tokens))
            return None
        if op == "release":
            reservation = peer.own(message)
            if reservation is None:
                return None
            key = self.ledger.release(
                reservation, int(message["requests"]), int(message["tokens"]),
                int(message["places"]), bool(message["end"]), int(message.get("left", 0)),
            )
            if message["end"]:
                peer.owned.discard(reservation)
            if message.get("closed") or message["end"]:
                peer.leases.pop(reservation, None)
                if key is not None:
                    self._leases.get(key, {}).pop(reservation, None)
            self._returned(key)
            return None
        if op == "reserve":
            key = str(message["key"])
            if not self._parked.get(key):
                reply = self._decide(peer, message, final=not self._leases.get(key), lease=True)
                if reply is not None and _for_place(reply) and self._waits.may_wait(key, limits_of(message["limits"])):
                    self._wait_for_place(peer, key, message)
                    return None
                if reply is not None:
                    return reply
            self._park(key, peer, message)
            return None
        if op == "lease":
            key = str(message["key"])
            reply = {"id": message["id"], "lease": None}
            if not self._parked.get(key):
                reply["lease"] = self._grant(peer, key, limits_of(message["limits"]), message["lease"])
            return reply
        if op == "check":
            # Only a refusal that stands: none while the key's leases or parked requests may still change it.
            key = str(message["key"])
            decision = None
            if self._grace is None and not self._leases.get(key) and not self._parked.get(key):
                decision = self.ledger.check(key, limits_of(message["limits"]))
            return {"id": message["id"], **(encode_decision(decision) if decision is not None else {})}
        if op == "usage":
            usage = self.ledger.usage(str(message["key"]), limits_of(message["limits"]))
            return {"id": message["id"], "usage": list(usage.__dict__.values()),
                    "in_flight": self.ledger.in_flight(str(message["key"]))}
        return {"id": message.get("id"), "error": f"unknown op {op!r}"}

    def _decide(self, peer: _Peer, message: dict[str, Any], final: bool, lease: bool) -> dict[str, Any] | None:
        """Reserves for ``message``; None when refused and not ``final``
        (others' leases may still give back enough). A lease is added to
        an admitted request that asks for one, when ``lease``."""
        key, limits = str(message["key"]), limits_of(message["limits"])
        decision = self.ledger.reserve(key, limits, int(message["tokens"]))
        if decision.reservation is None and not final:
            return None
        reply = {"id": message["id"], **encode_decision(decision)}
        want = message.get("lease")
        if decision.reservation is not None:
            peer.owned.add(decision.reservation)
            if want and lease:
                reply["lease"] = self._grant(peer, key, limits, want)
        return reply

    def _grant(self, peer: _Peer, key: str, limits: Limits, want: list[int]) -> list[Any] | None:
        """A lease for ``peer`` of up to ``want`` (requests, tokens), as sent on the wire."""
        granted = self.ledger.lease(key, limits, int(want[0]), int(want[1]))
        if granted is None:
            return None
        peer.owned.add(granted.reservation)
        peer.leases[granted.reservation] = key
        self._leases.setdefault(key, {})[granted.reservation] = peer
        return [granted.reservation, granted.requests, granted.tokens, granted.places, granted.valid_s,
                list(granted.usage.__dict__.values())]

    def _park(self, key: str, peer: _Peer, message: dict[str, Any]) -> None:
        """``message`` waits for the key's leases to come back: their holders
        are asked for them, and it is decided at the latest after ``RECALL_WAIT_S``."""
        if peer not in self._peers:
            return  # its replica is gone: nothing may be booked for it
        self._parked.setdefault(key, []).append((peer, message))
        if key not in self._recalls:
            for holder in set(self._leases.get(key, {}).values()):
                holder.send({"op": "recall", "key": key})
            loop = asyncio.get_running_loop()
            self._recalls[key] = loop.call_later(RECALL_WAIT_S, self._retry, key, True)

    def _wait_for_place(self, peer: _Peer, key: str, message: dict[str, Any]) -> None:
        """``message``, refused for the key's concurrency limit alone, is
        decided again each time one of its places comes free, for a moment
        (``gateway.auth.places``); the last refusal stands, or waits for
        other replicas' leases when they hold some of the key's places."""
        reply: dict[str, Any] | None = None

        def decided() -> bool:
            nonlocal reply
            if peer not in self._peers:
                return True
            reply = self._decide(peer, message, final=True, lease=False)
            return not _for_place(reply)

        async def waiting() -> None:
            nonlocal reply
            if not await self._waits.until(key, decided):
                if peer not in self._peers:
                    return  # its replica went meanwhile: nothing is booked for it
                if self._leases.get(key):
                    self._park(key, peer, message)
                    return
                reply = self._decide(peer, message, final=True, lease=False)
            if peer in self._peers and reply is not None:
                peer.send(reply)

        task = asyncio.get_running_loop().create_task(waiting())
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    def _returned(self, key: str | None) -> None:
        self._waits.freed(key)
        if key is not None and self._parked.get(key):
            self._retry(key)

    def _retry(self, key: str, force: bool = False) -> None:
        """Decides what waits for ``key`` now that something came back (all
        of it once no lease is left out, or when ``force``d)."""
        waiting = self._parked.pop(key, [])
        still = []
        for peer, message in waiting:
            final = force or not self._leases.get(key)
            reply = self._decide(peer, message, final=final, lease=False)
            if reply is None:
                still.append((peer, message))
            else:
                peer.send(reply)
        if still:
            self._parked[key] = still
            return
        timer = self._recalls.pop(key, None)
        if timer is not None:
            timer.cancel()


def _for_place(reply: dict[str, Any] | None) -> bool:
    """Whether ``reply`` refuses its request for the key's concurrency limit alone."""
    refusal = reply.get("refusal") if reply is not None else None
    return refusal is not None and refusal[0] == "concurrent"
