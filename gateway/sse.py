"""Server-sent events as OpenAI sends them.

Each chunk is ``data: <json>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``.
An error after the first byte is an error frame followed by the done frame.
"""

from __future__ import annotations

import json
from typing import Any

MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def frame(payload: dict[str, Any]) -> bytes:
    """One ``data:`` frame holding ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_frames(envelope: dict[str, Any]) -> bytes:
    """The frames that end a stream with an error: the error, then ``[DONE]``."""
    return frame(envelope) + DONE


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
