"""A request's deadlines on the ingress: its model's ``request_timeout_s``,
and the ingress replica's stop.

A stopping replica lets requests in flight run for its front door's grace,
after which the server cancels them: a whole answer would get uvicorn's
plain-text 500 and a stream would end mid-body, without its last chunk.
So the requests still running shortly before that are stopped here instead,
as ``request_timeout_s`` stops them: the engine request is aborted and the
client gets an error in its API's shape (503 ``shutting_down``; a stream,
an error frame and its end), which the access log and metrics count.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.errors import GatewayError, RequestTimeoutError, ShuttingDownError


def timed_out(timeout: float | None) -> RequestTimeoutError:
    """The error of a request that ran past its model's ``request_timeout_s``."""
    return RequestTimeoutError(
        f"The model did not finish within this gateway's limit of {timeout:g} s; the request was stopped."
    )


def closing_window_s(grace_s: float) -> float:
    """How long before its front door's cut a stopping replica stops its
    requests: time for each to abort its engine request, hear from its model
    replica that it has stopped the stream (at once, as a rule: a relayed
    stream waits at most 1 s for that word, one whose replica writes to the
    client's socket up to the 5 s it waits for an outcome, and a replica that
    slow has its stream cut by the server after all) and write its error."""
    return min(2.0, grace_s / 2)


class Stopping:
    """The stop of one ingress replica, shared by its requests' deadlines."""

    def __init__(self) -> None:
        self._at: float | None = None  # loop time
        self._bounds: set[asyncio.Timeout] = set()

    def begin(self, grace_s: float) -> None:
        """The replica stops: requests running ``grace_s`` from now, less the
        closing window, are stopped then (those bounded from now on too)."""
        at = self._at = asyncio.get_running_loop().time() + grace_s - closing_window_s(grace_s)
        for bound in self._bounds:
            when = bound.when()
            if when is None or when > at:  # (one that has expired is already sooner)
                bound.reschedule(at)

    @asynccontextmanager
    async def bounded(self, deadline: float | None) -> AsyncIterator[None]:
        """Runs its body until ``deadline`` (loop time; None: none) or the
        stop, whichever comes first; past it, TimeoutError (``error`` says which)."""
        at = self._at if deadline is None else deadline if self._at is None else min(deadline, self._at)
        async with asyncio.timeout_at(at) as bound:
            self._bounds.add(bound)
            try:
                yield
            finally:
                self._bounds.discard(bound)

    def error(self, deadline: float | None, timeout: float | None, background: bool = False) -> GatewayError:
        """The error of a bound from ``deadline`` that ran out: the stop's,
        where that came first; else the model's ``timeout`` (its
        ``request_timeout_s``). ``background``: a background response's
        stream, which its replica generates on whether or not it is read."""
        if deadline is None or (self._at is not None and self._at <= deadline):
            what = (
                "stopped relaying this stream. The response is still being generated in the background; "
                "retrieve it by its id." if background else "stopped the request. Please retry."
            )
            return ShuttingDownError(
                "This gateway replica is shutting down, and the request did not finish in the time it "
                f"gives requests in flight (its `ingress.graceful_shutdown_s`): it {what}",
            )
        return timed_out(timeout)
