"""The LLM replica: one engine, answering unary calls over Ray handles and
streams over its own HTTP port (``models.llm.relay``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from gateway import autoscaling
from gateway.affinity import unpin_self
from gateway.errors import ENGINE_DEAD, GatewayError, ServiceUnavailableError
from gateway.heap_freeze import freeze_in_replica
from gateway.metrics.engine_pages import answer_scrapes
from gateway.deploy import INGRESS_NAME
from gateway.metrics.hub import replica_source
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from gateway.replica_logs import to_stderr
from models.llm.engine import EngineInfo, LLMEngine, make_engine
from models.llm.relay import StreamServer
from models.llm.stored import StoredResponses
from models.llm.tally import GenerationTally

if TYPE_CHECKING:
    from gateway.config import LLMModelConfig

logger = logging.getLogger(__name__)

# How often the replica looks at its engine, and how long a replica whose
# engine died keeps answering 503 (its requests in flight get their error
# frames) before it exits so that Serve starts a new one.
WATCH_S = 0.2
DEAD_GRACE_S = 0.5
# Of a model's ``graceful_shutdown_s``: Serve's own drain loop (2 s) before
# ``__del__``, and time for the engine to shut down before the controller kills.
STOP_MARGIN_S = 5.0
# How long a stopping replica tries to tell the gateway's metrics it goes.
GONE_WAIT_S = 1.0


class ClientErrorFilter(logging.Filter):
    """Drops Serve's traceback records for requests that failed by the client's fault.

    A 400 is an answer, not an incident; 5xx and bugs are still logged in full.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, GatewayError) and error.status_code < 500)


class LLMServer:
    """A Serve deployment class (made a deployment in ``gateway.app``).

    ``generate`` answers non-streaming requests with a ``Reply``: the
    response's JSON bytes and the request's outcome (tokens, timings); it
    raises ``gateway.errors.GatewayError`` for errors known up front. Streams
    arrive on the replica's own port (``relay_host``, ephemeral port), which
    ``record_replica_metadata`` publishes to Serve's routers: the ingress
    reads their bytes straight from the engine. Streams and handle calls are
    each held to the model's ``max_ongoing_requests`` and
    ``max_queued_requests``.
    """

    # Ray actors (and so Serve replicas) may construct asynchronously.
    async def __init__(  # type: ignore[misc]
        self,
        config: LLMModelConfig,
        engine: LLMEngine | None = None,
        gateway_app: str | None = None,
        relay_host: str | None = None,
        exit_process: Callable[[], None] | None = None,
    ) -> None:
        # Serve calls ``__del__`` on a graceful stop and awaits it; set on the
        # instance so that the garbage collector, which looks on the class,
        # never makes a coroutine no one awaits.
        self.__del__ = self.stop
        to_stderr()
        logging.getLogger("ray.serve").addFilter(ClientErrorFilter())
        unpin_self()  # see gateway.affinity: the engine decides where it computes
        self._config = config
        self._dead = False
        self._watch: asyncio.Task[None] | None = None
        self._active_streams = 0
        self._requests = 0
        self._unloadable: dict[str, str] = {}  # adapters of its config that did not load: why
        self._names = frozenset({config.name})  # the models it answers for: its own, its adapters
        self._engine = engine if engine is not None else make_engine(config)
        # The replica's id, in the id of every response it stores (``gateway.protocol.relay``).
        replica = secrets.token_hex(relay.REPLICA_CHARS // 2)
        self._stored = StoredResponses(replica, config.kept_responses, self._engine.forget_response)
        logger.info("starting %s engine for %s", config.engine, config.name)
        await self._engine.start()
        self._relay = StreamServer(
            self.open_stream,
            relay_host or _node_address(),
            max_ongoing=config.max_ongoing_requests,
            max_queued=config.max_queued_requests,
            answer=self.generate,
            count=self.most_tokens,
            replica=replica,
        )
        self._relay_address = await self._relay.start()
        self._scrapes = _EngineScrapes.start(self._engine, gateway_app)
        self._watch = asyncio.get_running_loop().create_task(self._watch_engine(exit_process))
        freeze_in_replica()  # see gateway.heap_freeze: no full collection walks the start-up objects
        logger.info("%s ready (streams on %s:%d)", config.name, *self._relay_address[:2])

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A vLLM model's live settings (``VLLMModelConfig.replica_user_config``):
        the LoRA adapters it serves, loaded and unloaded in the running engine.

        Serve calls it once the replica has started and on each change. An
        adapter that cannot load leaves the replica serving the model and its
        other adapters, at start as in a change: requests for that adapter are
        answered 503 with vLLM's reason. Raising would fail the replica: in a
        change, Serve would replace it with one that cannot start either; at
        start, every replica started later (a scale-up, one replacing a dead
        engine) would fail while the adapter stays in the config, and the model
        would lose them all.
        """
        adapters = user_config.get("lora_adapters", {})
        # Adapters leaving are refused (503, retried elsewhere) before vLLM unloads them: admitted
        # meanwhile, a request would get vLLM's 404, which no client or fallback retries.
        self._names = self._names & {self._config.name, *adapters}
        failed = await self._engine.set_adapters(adapters)
        for reason in failed.values():
            logger.error("%s: %s; requests for it are answered 503 until it loads", self._config.name, reason)
        self._unloadable = failed
        self._names = frozenset({self._config.name, *adapters})

    async def _watch_engine(self, exit_process: Callable[[], None] | None) -> None:
        """Notices at once an engine that died (vLLM's engine-core process gone):
        new requests are answered 503 from then on, and after ``DEAD_GRACE_S``
        the replica's process exits, so Serve replaces it on its next health
        check instead of after three failed ones."""
        while not self._engine.dead():
            await asyncio.sleep(WATCH_S)
        self._dead = True
        logger.error("the engine of %s died; this replica exits so that a new one starts", self._config.name)
        await asyncio.sleep(DEAD_GRACE_S)
        (exit_process or _exit_now)()

    def _alive(self) -> None:
        # (Its engine is asked too: the watch sees it gone up to WATCH_S late, and a request
        # admitted meanwhile would fail as one the engine stopped under, tried nowhere else.)
        if self._dead or self._engine.dead():
            raise ServiceUnavailableError(ENGINE_DEAD)

    def _admit(self, request: EngineRequest) -> None:
        """Raises for a request this replica cannot answer: its engine is gone,
        its adapter could not load, or is not (or no longer) one it serves.

        The ingress sends an adapter's requests only while its table lists
        the adapter; a replica without it is one that a deploy started before,
        or kept after, the ingress's table changed (a model restarted without
        an adapter leaving it, or one added there that it has not loaded
        yet). 503, not vLLM's 404: the ingress tries another replica (one
        that serves it still), then the route's ``fallback``, and clients
        retry as they do a model restarting."""
        self._alive()
        reason = self._unloadable.get(request.model) if self._unloadable else None
        if reason is not None:
            raise ServiceUnavailableError(reason)
        if request.model and request.model not in self._names:
            raise ServiceUnavailableError(
                f"This replica of {self._config.name} does not serve {request.model!r} now: its LoRA adapters "
                "are changing. Retry shortly."
            )

    async def generate(self, request: EngineRequest, tally: GenerationTally | None = None) -> Reply:
        """A whole answer; counts into ``tally`` when given (what a cancelled one generated)."""
        self._admit(request)
        self._requests += 1
        request = self._stored.admit(request)
        tally = tally if tally is not None else GenerationTally(request.arrived)
        if request.endpoint == "responses_input_items":
            return Reply(await self._input_items(request), tally.outcome())
        with self._stored.unless_refused(request):
            body = await self._engine.complete(request, tally)
        self._stored.deleted(request)
        if tally.continues is None:
            self._stored.ended(request)
        else:  # a background response: it generates on
            admitted = request
            tally.continues.add_done_callback(lambda _: self._stored.ended(admitted))
        return Reply(body, tally.outcome())

    async def _input_items(self, request: EngineRequest) -> bytes:
        """A stored response's input items, once the engine has shown that it
        keeps the response (one still being answered at once is not stored yet)."""
        retrieve = EngineRequest("responses_retrieve", {"response_id": request.body["response_id"]}, "", request.model)
        await self._engine.complete(retrieve, GenerationTally())
        return self._stored.input_items(request)

    async def open_stream(
        self, request: EngineRequest
    ) -> tuple[AsyncIterator[bytes], Callable[[], Outcome]]:
        """A stream's SSE frames, and its outcome once they have ended.

        Raises ``GatewayError`` for errors known before the first frame.
        Closing the frames early aborts the engine request.
        """
        self._admit(request)
        self._requests += 1
        request = self._stored.admit(request)
        tally = GenerationTally(request.arrived)
        with self._stored.unless_refused(request):
            frames = await self._engine.stream(request, tally)
        return self._counted(frames, tally, request), tally.outcome

    async def _counted(
        self, frames: AsyncIterator[bytes], tally: GenerationTally, request: EngineRequest
    ) -> AsyncIterator[bytes]:
        """The frames; once they end, or are left, also whatever generation goes
        on after them (a background response's), so that the outcome is whole."""
        self._active_streams += 1
        ended = False
        try:
            async for frame in frames:
                yield frame
            ended = True
        finally:
            self._active_streams -= 1
            aclose: Any = getattr(frames, "aclose", None)
            if aclose is not None:
                await aclose()
            if tally.continues is not None:
                await asyncio.gather(asyncio.shield(tally.continues), return_exceptions=True)
            # Stored by the engine once it ends: not when refused at its first
            # frame, nor left before its end, nor failed after it (vLLM ends with
            # its error event and keeps nothing), unless it runs in the background.
            whole = ended and tally.error is None
            self._stored.ended(request, stored=whole or tally.continues is not None)

    async def most_tokens(self, request: EngineRequest) -> int:
        """The prompt's tokens plus the most ``request`` may generate (``relay.COUNT``)."""
        self._admit(request)
        self._stored.check(request)
        return await self._engine.most_tokens(request)

    def record_replica_metadata(self) -> dict[str, Any]:
        """Serve calls this once the replica is up; its routers hand it to the
        ingress with each replica they choose."""
        return self._relay_address.metadata()

    def info(self) -> EngineInfo:
        return self._engine.info()

    def stats(self) -> dict[str, int]:
        """Requests this replica has received, streams open now, stored responses
        kept, and the start-up objects no full collection walks (``gateway.heap_freeze``)."""
        return {
            "requests": self._requests,
            "active_streams": self._active_streams,
            "stored_responses": len(self._stored),
            "frozen_objects": gc.get_freeze_count(),
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler counts the requests routed through Serve; an
        LLM's come by its own relay port. Their number goes to the
        deployment's policy (``models.llm.autoscaling``) as ``RELAYED``."""
        return {autoscaling.RELAYED: float(self._relay.ongoing)}

    def num_unfinished_requests(self) -> int:
        """Requests the engine is still working on (running or waiting)."""
        return self._engine.num_unfinished_requests()

    async def check_health(self) -> None:
        """Called by Serve's health checks; raising marks the replica unhealthy."""
        self._alive()
        await self._engine.check_health()

    async def stop(self) -> None:
        """A graceful stop (Serve's ``__del__``, once Serve's routers have
        stopped sending here): the relay port closes, its streams and bodies
        in flight finish (within the model's ``graceful_shutdown_s``, less a
        margin for the rest of the stop), then the engine shuts down."""
        if self._watch is not None:
            self._watch.cancel()
        # (A replica whose start failed has neither: Serve stops it all the same.)
        if (streams := getattr(self, "_relay", None)) is not None:
            await streams.stop(max(0.0, self._config.graceful_shutdown_s - STOP_MARGIN_S))
        if (scrapes := getattr(self, "_scrapes", None)) is not None:
            await scrapes.stop()
        if (engine := getattr(self, "_engine", None)) is not None:
            await engine.shutdown()


def _exit_now() -> None:
    logging.shutdown()
    os._exit(1)


def _node_address() -> str:
    """The address Ray's own services on this node listen on: reachable by the
    ingress wherever it runs, and no further than Ray itself."""
    import ray

    return str(ray.util.get_node_ip_address())


class _EngineScrapes:
    """Answers the gateway's scrapes with the engine's own metrics (vLLM's
    ``vllm:*``), rendered when a scrape asks (``gateway.metrics.engine_pages``),
    so ``/metrics`` shows them per replica."""

    def __init__(self, ingress: Any, source: str, render: Callable[[], str]) -> None:
        self._ingress = ingress
        self._source = source
        self._task = asyncio.get_running_loop().create_task(answer_scrapes(ingress, source, render))

    @classmethod
    def start(cls, engine: LLMEngine, gateway_app: str | None) -> _EngineScrapes | None:
        """None for engines that keep no metrics. The calls go to the ingress
        (in ``gateway_app``, else this replica's application), which keeps the
        pages or passes them to the metrics hub its replicas share."""
        if engine.metrics_text() is None:
            return None
        from ray import serve

        ingress = serve.get_deployment_handle(
            INGRESS_NAME, gateway_app or serve.get_replica_context().app_name, _check_exists=False
        )
        return cls(ingress, replica_source(), lambda: engine.metrics_text() or "")

    async def stop(self) -> None:
        """No scrape waits for this replica any more."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            await asyncio.wait_for(self._gone(), GONE_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the ingress may be stopping too; silent replicas are dropped anyway
            logger.debug("gateway's metrics not told of the stop: %s", exc)

    async def _gone(self) -> None:
        await self._ingress.engine_gone.remote(self._source)
