"""What an ingress replica serves with, per config: one immutable table.

A ``ServingTable`` holds, for one validated config, every model's client
(``LLMClient``: streams and whole answers over the replicas' own HTTP relay;
``ClassicalClient``: Serve handle calls, gathered into shared calls for
batched models), its kind and limits, the route table and the cohort header.
A reconfiguration builds a new table and swaps it in whole; a request reads
the table once, when it arrives, and is served by that one to its end.

Clients outlive tables: a model whose deployment stays (same name and kind)
keeps its client, and with it its connections, counts and learnt tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from gateway.auth.prompt_count import PromptCounter, counter_for
from gateway.config import GatewayConfig, ModelConfig, ModelKind
from gateway.errors import ServiceUnavailableError
from gateway.http.gather import Gatherer, Gathering
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_stream import RelayedStream
from gateway.http.replica_lookup import BoundedLookUp, RunningReplica
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from gateway.routing.table import RouteTable

logger = logging.getLogger(__name__)

Settle = Callable[[Outcome | None], None]


class ModelClient(Protocol):
    """How the ingress calls one model's replicas for a whole answer.

    ``unary`` starts the call and returns its answer as a future; cancelling
    the future aborts the engine request (for an LLM, ``abandoned`` then
    gets what was generated). ``ready`` returns when a call may be sent,
    after a bounded wait for a running replica where the client needs one;
    ``warm`` finds a running replica before any request needs one;
    ``stalled`` (None: never) fails with 503 once an unanswered call's model
    has no running replica. ``answered`` and ``lost`` tell the client how a
    call ended (answered; or refused because its replica was gone)."""

    kind: ModelKind
    source: Any  # the Serve handle the client was made from

    def unary(self, call: EngineRequest, abandoned: Settle | None = None, later: Settle | None = None) -> asyncio.Future[Reply]: ...

    async def ready(self) -> None: ...

    async def warm(self) -> None: ...

    def stalled(self) -> asyncio.Future[None] | None: ...

    def answered(self) -> None: ...

    def lost(self) -> None: ...


class LLMClient:
    """An LLM's replicas: streams and whole answers over their own relay
    (``ReplicaRelay``), and how to count its prompts here, learnt from one
    of them when a token limit first needs it (``gateway.auth.prompt_count``)."""

    kind: ModelKind = "llm"

    def __init__(self, handle: Any, replica_wait_s: float = 5.0, handoff: bool = True) -> None:
        self.source = handle
        self.relay = ReplicaRelay(handle, wait_s=replica_wait_s, handoff=handoff)
        self.counter: PromptCounter | None = None
        self.window: int | None = None
        self._learning: asyncio.Task[None] | None = None

    def unary(self, call: EngineRequest, abandoned: Settle | None = None, later: Settle | None = None) -> asyncio.Future[Reply]:
        return asyncio.ensure_future(self.relay.call(call, abandoned, later))

    async def stream(self, call: EngineRequest, unsent: Settle | None = None) -> RelayedStream:
        """Opens ``call``'s stream on a replica (``ReplicaRelay.open``)."""
        return await self.relay.open(call, unsent)

    async def ready(self) -> None:
        return None  # the relay bounds its own wait for a replica

    async def warm(self) -> None:
        await self.relay.warm()

    def stalled(self) -> asyncio.Future[None] | None:
        return None  # the relay's call ends when its replica does

    def answered(self) -> None:
        return None

    def lost(self) -> None:
        return None

    def learn_counter(self) -> None:
        """Starts learning the model's tokenizer in the background (once)."""
        if self._learning is None:
            self._learning = asyncio.ensure_future(self._learn())

    async def _learn(self) -> None:
        try:
            info = await self.source.options(method_name="info").remote()
            self.window = info.max_model_len
            # A large tokenizer takes a moment to build: not on the event loop.
            self.counter = await asyncio.to_thread(counter_for, getattr(info, "tokenizer", None))
        except Exception as exc:  # noqa: BLE001 - the replica keeps counting; try again later
            logger.info("could not learn a model's tokenizer: %s", exc)
            self._learning = None


class ClassicalClient:
    """A classical model's replicas through Serve's handle: one call per
    request, or, for a batched model (``gathering``), requests that arrive
    together sent as one call (``generate_many``) that the replica splits
    into its batch queue. Serve's router waits for a running replica as long
    as it takes; this client bounds that wait (``RunningReplica``).

    ``handle.options(...)`` builds a new handle each time: the methods are
    made here once, not per request."""

    def __init__(self, handle: Any, kind: ModelKind, replica_wait_s: float = 5.0) -> None:
        self.source = handle
        self.kind = kind
        self._one = handle.options(method_name="generate")
        self._many = handle.options(method_name="generate_many")
        self.running = RunningReplica(handle, wait_s=replica_wait_s)
        self.gather: Gatherer[EngineRequest] | None = None
        self._info: Any = None  # (made once it is needed: only embedding models are asked)
        self._window: int | None = None
        self._learnt = False
        self._learning = BoundedLookUp(self._learn_window, replica_wait_s)

    async def window(self) -> int | None:
        """The most tokens one input of this model holds (an embedding
        model's window; None: no such bound, or no replica said it within
        the wait ``ready`` bounds), asked of a replica once."""
        if not self._learnt:
            try:
                await self._learning.wait()
            except ServiceUnavailableError:
                pass  # (down or busy: the request finds out, or is reserved without it)
        return self._window

    def wakes(self, at_zero: bool) -> None:
        """Whether the model may be at zero replicas (autoscaling from 0): its
        look-ups then send it a call of ``info``, which wakes it."""
        self.running.wake = self._ask_info if at_zero else None

    def _ask_info(self) -> Any:
        if self._info is None:
            self._info = self.source.options(method_name="info")
        return self._info.remote()

    async def _learn_window(self) -> None:
        if self._info is None:
            self._info = self.source.options(method_name="info")
        try:
            info = await self._info.remote()
            self._window, self._learnt = info.max_model_len, True
        except Exception as exc:  # noqa: BLE001 - the bound without it; asked again by the next request
            logger.info("could not learn a classical model's window: %s", exc)

    def gather_by(self, group: Gathering | None) -> None:
        """Sends calls in groups as ``group`` says (None: one by one). A
        gatherer that exists keeps its calls in flight and takes the new
        bounds."""
        if group is None:
            self.gather = None
        elif self.gather is None:
            many = self._many
            self.gather = Gatherer(lambda calls: many.remote(calls), *group)
        else:
            self.gather.max_group, self.gather.max_in_flight, self.gather.max_hold_s, self.gather.capacity = group

    def unary(self, call: EngineRequest, abandoned: Settle | None = None, later: Settle | None = None) -> asyncio.Future[Reply]:
        response: Any = None
        if self.gather is not None:
            answer: asyncio.Future[Reply] = self.gather.submit(call)  # cancelled: dropped from its group
        else:
            response = self._one.remote(call)
            answer = asyncio.ensure_future(_result(response))

        def ended(done: asyncio.Future[Reply]) -> None:
            if not done.cancelled():
                return
            if response is not None:
                response.cancel()  # Serve's call, which aborts it on the replica
            if abandoned is not None:
                abandoned(None)  # nothing counts what a classical model did

        answer.add_done_callback(ended)
        return answer

    async def ready(self) -> None:
        if not self.running.fresh():
            await self.running.ready()

    async def warm(self) -> None:
        if self.kind == "embedding":  # (learnt before requests need it)
            await asyncio.gather(self.running.ready(), self.window())
        else:
            await self.running.ready()

    def stalled(self) -> asyncio.Future[None] | None:
        return self.running.stalled()

    def answered(self) -> None:
        self.running.seen()

    def lost(self) -> None:
        self.running.lost()  # its replica may be gone: look before the next call


async def _result(response: Any) -> Reply:
    return await response  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model as requests reach it: its client, kind, and the limits the
    ingress applies (``timeout_s``: its ``request_timeout_s``)."""

    name: str
    kind: ModelKind
    client: LLMClient | ClassicalClient
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class ServingTable:
    """Everything requests are routed and served by under one config."""

    routes: RouteTable
    cohort_header: str = "x-session-id"
    models: Mapping[str, ServedModel] = field(default_factory=lambda: MappingProxyType({}))

    def model(self, name: str) -> ServedModel:
        """The concrete model ``name``; KeyError when it is not served."""
        return self.models[name]

    def llms(self, names: Iterable[str]) -> list[ServedModel]:
        """Those of ``names`` that are LLMs served here, in order."""
        return [self.models[n] for n in names if n in self.models and self.models[n].kind == "llm"]


def client_for(
    model: ModelConfig, handle: Any, replica_wait_s: float, handoff: bool = True
) -> LLMClient | ClassicalClient:
    """A new client of ``model``'s deployment through ``handle``; ``handoff``:
    whether an LLM's streams may be handed to its replicas (``ReplicaRelay``)."""
    if model.kind == "llm":
        return LLMClient(handle, replica_wait_s, handoff)
    return ClassicalClient(handle, model.kind, replica_wait_s)


def build_table(
    config: GatewayConfig,
    routes: RouteTable,
    handles: Mapping[str, Any],
    previous: ServingTable | None,
    replica_wait_s: float,
    handoff: bool = True,
    relearn: Collection[str] = (),
) -> ServingTable:
    """The table for ``config``: each model reached through ``handles[name]``;
    the clients of ``previous`` are kept where the handle and kind are the
    same, except for the models in ``relearn`` (what a client learnt of its
    replicas, such as their tokenizer, is theirs). Limits (capacity,
    gathering) are set on the clients here, before the table is swapped in."""
    known = previous.models if previous is not None else {}
    models: dict[str, ServedModel] = {}
    for model in config.models:
        handle = handles[model.name]
        old = known.get(model.name)
        same = old is not None and old.client.source is handle and old.kind == model.kind and model.name not in relearn
        client = old.client if same and old is not None else client_for(model, handle, replica_wait_s, handoff)
        if isinstance(client, ClassicalClient):
            client.gather_by(Gathering.for_model(model))
            client.wakes(model.autoscaling is not None and model.autoscaling.min_replicas == 0)
        else:
            client.relay.capacity = _capacity(model)
            client.relay.places = model.max_ongoing_requests
        models[model.name] = ServedModel(model.name, model.kind, client, model.request_timeout_s)
    for adapter, base in config.adapters().items():  # served by the base model's replicas
        models[adapter] = replace(models[base.name], name=adapter)
    return ServingTable(routes, config.routing.cohort_header, MappingProxyType(models))


def _capacity(model: ModelConfig) -> int | None:
    """Requests one of an LLM's replicas takes at once, running and queued
    (None: no bound): refused at the ingress beyond it."""
    if model.max_queued_requests < 0:
        return None
    return model.max_ongoing_requests + model.max_queued_requests
