"""The end of an answer on a connection to an LLM replica: its outcome, the
line that follows its ``END``, read whole even when its caller stops
waiting for it (the client left, or its deadline passed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

from gateway.http.background import in_background
from gateway.http.relay_connection import READ_BYTES
from gateway.protocol import relay
from gateway.protocol.engine import Outcome

# How long an abandoned request's replica gets to report what it generated;
# a background response's, what it generates until it ends.
ABANDONED_OUTCOME_S = 5.0
BACKGROUND_OUTCOME_S = 3600.0


async def outcome_after(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    then: Callable[[Outcome | None], None],
    wait_s: float = ABANDONED_OUTCOME_S,
    read: bytes | None = None,
) -> None:
    """Reads what is left of an answer, up to its outcome (after ``read``, the
    bytes past its ``END`` already read, if it was); ``then`` gets it (None:
    the replica did not say within ``wait_s``), ``stopped`` where bytes of
    the answer were left unread before its ``END``. The connection is closed
    once the outcome's line is in, whether or not the replica would keep it."""
    skipped = [False]
    try:
        read = await asyncio.wait_for(_through_outcome(reader, read, skipped), wait_s)
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
        outcome = None if read is None else readable_outcome(read.partition(b"\n")[0])
        if outcome is not None and skipped[0]:
            outcome = dataclasses.replace(outcome, stopped=True)  # bytes its caller never had
        then(outcome)


async def _through_outcome(reader: asyncio.StreamReader, read: bytes | None, skipped: list[bool]) -> bytes | None:
    """What follows an answer's ``END`` (``read``: what was read of it
    already), up to the end of the outcome's line or of the connection;
    None when the connection ends before ``END``. ``skipped`` is set when
    bytes of the answer came before its ``END``."""
    while read is None or b"\n" not in read:
        data = await reader.read(READ_BYTES)
        if not data:
            break
        if read is not None:
            read += data
            continue
        end = data.find(relay.END)
        if end:  # (-1: none there)
            skipped[0] = True
        if end >= 0:
            read = data[end + 1 :]
    return read


def abandon(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    then: Callable[[Outcome | None], None],
    wait_s: float = ABANDONED_OUTCOME_S,
    read: bytes | None = None,
) -> None:
    """Tells the replica the caller left (half-closing the connection: the
    engine request is aborted, unless it runs in the background) and hands
    ``then`` what it generated (``read``: the bytes past its ``END``, when the
    caller had read that far)."""
    # (A connection that only ends means the ingress died: ``relay.LEFT``. A
    # replica that closed it already has sent all it will: that is read.)
    with contextlib.suppress(OSError):
        writer.write(relay.LEFT)
        writer.write_eof()
    in_background(outcome_after(reader, writer, then, wait_s, read))


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes | None]:
    """A whole answer's body, and what followed its ``END`` so far (None:
    the connection closed before ``END``)."""
    parts: list[bytes] = []
    while data := await reader.read(READ_BYTES):
        end = data.find(relay.END)
        if end >= 0:
            parts.append(data[:end])
            return b"".join(parts), data[end + 1 :]
        parts.append(data)
    return b"".join(parts), None


class OutcomeLine:
    """The outcome that follows an answer's ``END``, read up to its newline.
    ``read`` holds what has been read of it so far: a caller that stops
    waiting for the rest (its client left, its deadline passed) hands it on
    (``abandon``), and the outcome is still known."""

    def __init__(self, read: bytes) -> None:
        self.read = read

    async def line(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """The outcome's line, and whether the connection may carry another
        request: the line ended with its newline and nothing followed."""
        while (newline := self.read.find(b"\n")) < 0:
            data = await reader.read(READ_BYTES)
            if not data:
                return self.read, False  # the replica closed after it
            self.read += data
        return self.read[:newline], newline == len(self.read) - 1


def readable_outcome(line: bytes) -> Outcome | None:
    """The outcome on ``line``; None when it cannot be read (the replica
    stopped inside it)."""
    try:
        return relay.decode_outcome(line)
    except (ValueError, TypeError):
        return None
