"""One JSON line per request, and one per server error, with the request's id.

Lines hold what an operator needs (method, route, model, variant, status,
timings, token counts, request id) and never a prompt, a completion, a
header or a query string. They are buffered and written whole with one
``write`` each flush, so several ingress replicas appending to one file never
interleave within a line. A write that fails (a full disk) drops its lines
with one warning, and serving goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from gateway.metrics.recorder import RequestRecord

logger = logging.getLogger(__name__)

FLUSH_LINES = 64


class AccessLog:
    """Writes to ``sink``: ``stderr``, ``off``, or a file path (appended to).

    ``replica`` names the ingress replica in every line.
    """

    def __init__(self, sink: str, replica: str = "") -> None:
        self._replica = replica
        self._pending: list[str] = []
        self._failing = False  # the last write failed (said once)
        self._cut = False  # ... and left a line half-written
        self._fd: int | None
        if sink == "off":
            self._fd = None
        elif sink == "stderr":
            self._fd = 2
        else:
            self._fd = os.open(sink, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def request(
        self,
        record: RequestRecord,
        method: str,
        status: int,
        duration_s: float,
        overhead_s: float | None,
    ) -> None:
        line: dict[str, Any] = {
            "time": _now(),
            "log": "access",
            "request_id": record.request_id,
            "replica": self._replica,
            "method": method,
            "route": record.route,
            "model": record.model or None,
            "variant": record.variant or None,
            "key": record.key or None,
            "stream": record.stream,
            "status": status,
            "duration_ms": round(duration_s * 1000, 3),
            "overhead_ms": None if overhead_s is None else round(overhead_s * 1000, 3),
        }
        if record.stream:  # written by the model replica itself (handed the client's socket), or relayed
            line["handoff"] = record.handed_over
        if record.outcome is not None and (
            record.outcome.prompt_tokens or record.outcome.completion_tokens
        ):  # classifiers count no tokens
            line["prompt_tokens"] = record.outcome.prompt_tokens
            line["completion_tokens"] = record.outcome.completion_tokens
        if record.error is not None:
            line["error"] = record.error
        self._add(line)

    def error(self, request_id: str, status: int, code: str | None, message: str) -> None:
        """A server-side failure (5xx), under the id the client was given."""
        self._add(
            {
                "time": _now(),
                "log": "error",
                "request_id": request_id,
                "replica": self._replica,
                "status": status,
                "error": code,
                "message": message,
            }
        )

    def _add(self, line: dict[str, Any]) -> None:
        if self._fd is None:
            return
        self._pending.append(json.dumps(line, separators=(",", ":")) + "\n")
        if len(self._pending) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered lines in one ``write``; called often by the replica."""
        if not self._pending or self._fd is None:
            return
        data = ("\n" if self._cut else "").encode() + "".join(self._pending).encode()
        lines, sent = len(self._pending), 0
        self._pending.clear()
        try:
            while sent < len(data):  # a pipe may take less than all of it
                sent += os.write(self._fd, data[sent:])
        except OSError as exc:
            self._cut = data[sent - 1] != ord("\n") if sent else self._cut
            if not self._failing:
                logger.warning("access log: a write failed (%s); its lines, %d, and those after are dropped "
                               "until writing works again", exc, lines)
            self._failing = True
            return
        if self._failing:
            logger.warning("access log: writing works again")
        self._failing = self._cut = False


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
