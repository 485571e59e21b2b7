"""Server-sent events as OpenAI sends them.

Each chunk is ``data: <json>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``.
An error after the first byte is an error frame followed by the done frame.
The Responses API and Anthropic's Messages API name each event
(``event: <type>``), send no ``[DONE]`` and end a failed stream with an
``error`` event.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

# As OpenAI and vLLM's own server send it.
MEDIA_TYPE = "text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"


def frame(payload: dict[str, Any]) -> bytes:
    """One ``data:`` frame holding ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_frames(envelope: dict[str, Any]) -> bytes:
    """The frames that end a stream with an error: the error, then ``[DONE]``."""
    return frame(envelope) + DONE


def responses_error_event(envelope: dict[str, Any], sequence_number: int | None = None) -> bytes:
    """The Responses API's ``error`` event for the gateway's error ``envelope``
    (``{"error": {...}}``); ``sequence_number`` where the sender knows it."""
    error = envelope.get("error", envelope)
    payload: dict[str, Any] = {
        "type": "error", "code": error.get("code"), "message": error.get("message"), "param": error.get("param"),
    }
    if sequence_number is not None:
        payload["sequence_number"] = sequence_number
    return b"event: error\ndata: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Error(Protocol):
    """An error that knows its envelopes (``gateway.errors.GatewayError``)."""

    def to_dict(self) -> dict[str, Any]: ...

    def to_anthropic(self) -> dict[str, Any]: ...


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """One named event: an ``event:`` line, then ``payload`` as a ``data:`` line."""
    return f"event: {kind}\ndata: ".encode() + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def stream_error(endpoint: str, error: Error, sequence_number: int | None = None) -> bytes:
    """What ends a stream of ``endpoint`` with ``error`` (a Responses API
    stream's ``error`` event numbered ``sequence_number``, where known)."""
    if endpoint in ("responses", "responses_retrieve"):  # (a stored response's stream, replayed)
        return responses_error_event(error.to_dict(), sequence_number)
    if endpoint == "messages":
        return event("error", error.to_anthropic())
    return error_frames(error.to_dict())


def stream_error_after(endpoint: str, error: Error, sent: bytes) -> bytes:
    """What ends a stream of ``endpoint`` whose latest bytes were ``sent``
    with ``error``: its error frame, numbered after them, and first a blank
    line where they stop inside a frame (its replica broke off mid-frame),
    so that the error is an event of its own, not the end of that one."""
    frame = stream_error(endpoint, error, next_sequence_number(sent))
    return frame if not sent or sent.endswith(b"\n\n") else b"\n\n" + frame


_SEQUENCE = b'"sequence_number":'
# How much of the bytes written before the latest a stream keeps, to number an
# error event after them where the latest read ends inside an event's number.
TAIL_BYTES = 256


def next_sequence_number(sent: bytes) -> int | None:
    """The number after the last whole ``sequence_number`` in ``sent`` (the
    latest bytes of a Responses API stream: one whose digits run to their end
    may have been cut there, and the one before it is taken); None when they
    hold none."""
    end_at = len(sent)
    while (at := sent.rfind(_SEQUENCE, 0, end_at)) >= 0:
        digits = sent[at + len(_SEQUENCE) :].lstrip()
        end = 0
        while end < len(digits) and digits[end : end + 1].isdigit():
            end += 1
        if 0 < end < len(digits):
            return int(digits[:end]) + 1
        end_at = at
    return None


def parse(stream: bytes) -> list[Any]:
    """Splits an SSE byte stream into decoded payloads; ``[DONE]`` becomes None.

    Raises ValueError for bytes that are not ``data:`` frames.
    """
    payloads: list[Any] = []
    for block in stream.split(b"\n\n"):
        if not block:
            continue
        if not block.startswith(b"data: "):
            raise ValueError(f"not an SSE data frame: {block[:80]!r}")
        data = block[len(b"data: ") :]
        payloads.append(None if data == b"[DONE]" else json.loads(data))
    return payloads


_BOUNDARY = b"\n\n"


class WholeEvents:
    """Passes on a relayed stream's bytes up to the end of its latest whole
    event, holding back the start of one that a read cut short until the
    rest of it is read. A replica that breaks off mid-event then leaves its
    client with whole events only, and the error event that follows them is
    read as one of its own (a half event completed by it would reach an SDK
    as unreadable JSON). A read that ends an event, as a replica's reads
    almost always do, costs one comparison."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[bytes] = []

    def take(self, data: bytes) -> bytes:
        """What of the bytes held and ``data`` ends at an event's end."""
        held = self._held
        if not held:
            if data.endswith(_BOUNDARY) or not data:
                return data
            at = data.rfind(_BOUNDARY)
            held.append(data[at + 2 :] if at >= 0 else data)
            return data[: at + 2] if at >= 0 else b""
        at = data.rfind(_BOUNDARY)
        if at >= 0:
            end = at + 2
        elif data.startswith(b"\n") and held[-1].endswith(b"\n"):
            end = 1  # the boundary spans the two reads
        else:
            held.append(data)
            return b""
        whole = b"".join([*held, data[:end]])
        self._held = [data[end:]] if end < len(data) else []
        return whole

    def rest(self) -> bytes:
        """The bytes held, taken: the stream ended (its end mark read) without ending its last event."""
        held, self._held = self._held, []
        return b"".join(held)
