"""Writing to a peer whose connection may already be lost.

asyncio's own transports drop a write to a lost connection without a word;
uvloop's (Ray Serve's replicas and the ingress run on it) raise RuntimeError
once the transport is closed. The gateway's connections between its own
processes (an ingress and its models' relay ports, the keys ledger) treat a
lost peer as a ConnectionError wherever it is found: a replica that died
between a connection's opening and the request's sending is one another
replica may answer, not a 500. ``PeerWriter`` makes a write find it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

LOST = "the connection was lost"


class PeerWriter(asyncio.StreamWriter):
    """A StreamWriter whose writes raise ConnectionResetError once its
    connection is closing (lost, or closed here), on any event loop."""

    _wrapped: asyncio.StreamWriter | None = None

    @classmethod
    def over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> PeerWriter:
        """``writer``'s connection (one that asyncio opened, or made for a
        server's callback), written through a PeerWriter. ``writer`` is kept:
        collected while its connection is open, it would close it."""
        transport = writer.transport
        peer = cls(transport, transport.get_protocol(), reader, asyncio.get_running_loop())  # type: ignore[arg-type]
        peer._wrapped = writer
        return peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._alive()
        super().write(data)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._alive()
        super().writelines(data)

    def write_eof(self) -> None:
        self._alive()
        super().write_eof()

    def _alive(self) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError(LOST)
