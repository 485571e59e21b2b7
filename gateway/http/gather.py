"""Gathers concurrent requests to one batched model into shared calls.

A batched (classical) model replica forms its batches from the calls it
receives, and every call costs the replica its transport: under load that
per-call cost, not the model, bounds throughput. So each ingress replica keeps
at most ``max_in_flight`` calls out per model; requests that arrive while that
many are out wait and leave together in the next call (at most ``max_group``
requests), which the replica splits again into its batch queue. A request
that finds a free slot leaves at once, so light traffic pays no extra wait.

A replica whose batches wait for company (``batch_wait_timeout_s`` > 0) must
not wait for requests held here: with ``max_hold_s`` set, requests held that
long leave regardless of the calls out.

Serve counts calls, not the requests they carry, so its queue bound
(``max_queued_requests``) cannot see them: ``capacity`` bounds the requests
held here and out, beyond which a request is refused 503 ``overloaded``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from gateway.errors import OverloadedError

if TYPE_CHECKING:
    from gateway.config import ModelConfig

Call = TypeVar("Call")

# The longest a request is held for a batch that itself waits for company.
MAX_HOLD_S = 0.005
# Calls kept in flight per replica the ingress may reach.
CALLS_PER_REPLICA = 2
OVERLOADED = "The model is receiving too many requests; please retry shortly."


class Gathering(NamedTuple):
    """How an ingress replica gathers requests to one batched model."""

    max_group: int  # the most requests one call carries
    max_in_flight: int  # calls kept out before requests wait to leave together
    max_hold_s: float | None  # the longest a request waits; None: until a call returns
    capacity: int | None = None  # the most requests held and out; None: no bound

    @classmethod
    def for_model(cls, model: ModelConfig) -> Gathering | None:
        """The gathering a batched classical model gets: calls of up to its
        ``max_batch_size`` requests, ``CALLS_PER_REPLICA`` in flight per
        replica it may reach, and requests held until a call returns when
        its batches do not wait, else half its batch wait (at most
        ``MAX_HOLD_S``), so a waiting batch is never kept waiting by the
        ingress. A model with a queue bound takes at most what Serve would
        from one caller: its replicas' places (``max_ongoing_requests``
        each) and the caller's queue (``max_queued_requests``). None (call
        by call): LLMs, which batch in the engine, and models with batching off."""
        from gateway.config import ClassicalModelConfig

        if not isinstance(model, ClassicalModelConfig) or model.max_batch_size == 1:
            return None
        wait = model.batch_wait_timeout_s
        hold = min(wait / 2, MAX_HOLD_S) if wait > 0 else None
        capacity = None
        if model.max_queued_requests >= 0:
            capacity = model.max_replicas * model.max_ongoing_requests + model.max_queued_requests
        return cls(model.max_batch_size, CALLS_PER_REPLICA * model.max_replicas, hold, capacity)

Send = Callable[[list[Call]], Awaitable[list[Any]]]


class Gatherer(Generic[Call]):
    """Sends calls in groups; each caller gets its own answer or error.

    ``send`` takes a group and returns one result per call, in order: an
    answer, or an exception instance meant for that call alone. An exception
    ``send`` raises reaches every call of the group.
    """

    def __init__(
        self,
        send: Send[Call],
        max_group: int,
        max_in_flight: int,
        max_hold_s: float | None = None,
        capacity: int | None = None,
    ) -> None:
        self._send = send
        self.max_group = max_group
        self.max_in_flight = max_in_flight
        self.max_hold_s = max_hold_s
        self.capacity = capacity
        self._held = 0  # requests submitted and not yet answered (nor given up)
        self._pending: deque[tuple[Call, asyncio.Future[Any]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, call: Call) -> asyncio.Future[Any]:
        """The answer to ``call``; cancel the future to give it up. When
        ``capacity`` requests are held and out, the answer is OverloadedError
        (503), as any call's error (a route's fallback sees it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.capacity is not None and self._held >= self.capacity:
            future.set_exception(OverloadedError(OVERLOADED, retry_after_s=1))
            return future
        self._held += 1
        future.add_done_callback(self._answered)
        self._pending.append((call, future))
        if self._in_flight < self.max_in_flight:
            self._next_group()
        elif self.max_hold_s is not None and self._timer is None:
            self._timer = loop.call_later(self.max_hold_s, self._release_held)
        return future

    def _answered(self, _: asyncio.Future[Any]) -> None:
        self._held -= 1

    def _release_held(self) -> None:
        """Sends every held request now, past the cap on calls out."""
        self._timer = None
        while self._pending:
            self._next_group()

    def _next_group(self) -> None:
        group: list[tuple[Call, asyncio.Future[Any]]] = []
        while self._pending and len(group) < self.max_group:
            call, future = self._pending.popleft()
            if not future.cancelled():  # the client left while it waited
                group.append((call, future))
        if not group:
            return
        self._in_flight += 1
        task = asyncio.create_task(self._run(group))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)
        # Once every request of the group is given up, so is the call (its
        # replica stops working on it, and its slot here is free at once).
        waiting = [len(group)]

        def given_up(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                waiting[0] -= 1
                if not waiting[0] and not task.done():
                    task.cancel()

        for _, future in group:
            future.add_done_callback(given_up)

    async def _run(self, group: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        sent: Any = None
        try:
            sent = self._send([call for call, _ in group])
            results = await sent
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the group
            if isinstance(exc, asyncio.CancelledError) and hasattr(sent, "cancel"):
                sent.cancel()  # every caller gave up: Serve's response stops the replica's work
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(group, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            if self._pending:
                self._next_group()
