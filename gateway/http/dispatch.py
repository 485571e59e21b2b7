"""Forwards OpenAI requests to model replicas and shapes the HTTP response."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from gateway import sse
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotSupportedError,
    RequestReadTimeoutError,
    RequestTimeoutError,
    RequestTooLargeError,
    ResponseNotFoundError,
    ServiceUnavailableError,
)
from gateway.auth.limiter import LocalLimiter
from gateway.auth.prompt_count import PromptCounter, counter_for, most_tokens
from gateway.http.auth import api_key
from gateway.http.gather import Gatherer, Gathering
from gateway.http.handlers import as_gateway_error
from gateway.http.limits import Admission, admit, embedding_tokens
from gateway.http.relay import (
    BACKGROUND_OUTCOME_S,
    RelayedStream,
    RelayResponse,
    ReplicaRelay,
    RunningReplica,
    StreamCutError,
)
from gateway.metrics.recorder import GatewayMetrics, RequestRecord
from gateway.protocol import relay
from gateway.protocol.engine import Endpoint, EngineRequest, Outcome, Reply
from gateway.protocol.envelope import MessagesEnvelope, ModelEnvelope, RequestEnvelope, ResponsesEnvelope
from gateway.routing.table import Route, RouteTable

logger = logging.getLogger(__name__)

VARIANT_HEADER = "x-gateway-variant"
ANTHROPIC_REQUEST_ID = "request-id"

# The model kinds (gateway.config.ENGINE_KINDS) each endpoint can be answered by.
ENDPOINT_KINDS: dict[str, frozenset[str]] = {
    "chat": frozenset({"llm"}),
    "completion": frozenset({"llm"}),
    "responses": frozenset({"llm"}),
    "responses_retrieve": frozenset({"llm"}),
    "responses_cancel": frozenset({"llm"}),
    "messages": frozenset({"llm"}),
    "messages_count": frozenset({"llm"}),
    "embedding": frozenset({"embedding"}),
    "predict": frozenset({"classifier", "embedding"}),
    "infer": frozenset({"classifier", "embedding"}),
}
ENDPOINT_PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "responses": "/v1/responses",
    "responses_retrieve": "/v1/responses/{response_id}",
    "responses_cancel": "/v1/responses/{response_id}/cancel",
    "messages": "/v1/messages",
    "messages_count": "/v1/messages/count_tokens",
    "embedding": "/v1/embeddings",
    "predict": "/v1/models/{model}:predict",
    "infer": "/v2/models/{model}/infer",
}


class _ModelHandles:
    """Per model, what the hot path calls, made once: the unary handle method
    (classical models) and the relay (LLMs: streams and whole answers).

    ``handle.options(...)`` builds a new handle each call: doing it per request
    costs measurable time, so it is cached here.
    """

    def __init__(self, handle: Any, replica_wait_s: float = 5.0) -> None:
        self.source = handle
        self.unary = handle.options(method_name="generate")
        self.relay = ReplicaRelay(handle, wait_s=replica_wait_s)
        self.running = RunningReplica(handle, wait_s=replica_wait_s)  # classical models' bounded wait
        self.gather: Gatherer[EngineRequest] | None = None
        # How to count an LLM's prompts here (``gateway.auth.prompt_count``),
        # learnt from one of its replicas when a token limit first needs it.
        self.counter: PromptCounter | None = None
        self.window: int | None = None
        self._learning: asyncio.Task[None] | None = None

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

    def gather_by(self, group: Gathering | None) -> None:
        """Sends unary calls in groups as ``group`` says (None: one by one)."""
        if group is None:
            self.gather = None
        elif self.gather is None:
            many = self.source.options(method_name="generate_many")
            self.gather = Gatherer(lambda calls: many.remote(calls), *group)
        else:
            self.gather.max_group, self.gather.max_in_flight, self.gather.max_hold_s = group


class ModelDispatcher:
    """Parses just what routing needs, picks the model, forwards over Ray.

    Raises ``gateway.errors.GatewayError`` for anything known before the first
    byte; an error after it ends the stream with an SSE error frame.
    """

    def __init__(
        self,
        routes: RouteTable,
        handles: Mapping[str, Any],
        retry_after_s: int,
        cohort_header: str = "x-session-id",
        kinds: Mapping[str, str] | None = None,
        metrics: GatewayMetrics | None = None,
        limiter: Any = None,
        max_body_bytes: int = 32 * 1024 * 1024,
        read_timeout_s: float | None = None,
        replica_wait_s: float = 5.0,
    ) -> None:
        self._retry_after_s = retry_after_s
        self._replica_wait_s = replica_wait_s
        self._max_body_bytes = max_body_bytes
        self._read_timeout_s = read_timeout_s
        # Where limited API keys reserve (``gateway.auth.limiter``).
        self.limiter = limiter if limiter is not None else LocalLimiter()
        self._metrics = metrics if metrics is not None else GatewayMetrics()
        self._shadow_calls: set[asyncio.Task[None]] = set()
        self._handles: dict[str, _ModelHandles] = {}
        self.use_routes(routes, cohort_header, handles, kinds)

    @property
    def routes(self) -> RouteTable:
        return self._routes

    def use_routes(
        self,
        routes: RouteTable,
        cohort_header: str,
        handles: Mapping[str, Any] | None = None,
        kinds: Mapping[str, str] | None = None,
        gathering: Mapping[str, Gathering] | None = None,
        timeouts: Mapping[str, float] | None = None,
        capacities: Mapping[str, int] | None = None,
    ) -> None:
        """Routes requests that arrive from now on with ``routes``.

        ``handles`` (when given) replace the model handles; ``kinds`` name each
        model's kind (all `llm` when not given); ``gathering`` names the
        batched models whose concurrent requests share calls, and how;
        ``timeouts`` the models whose requests have a time limit (seconds);
        ``capacities`` the LLMs whose replicas take a bounded number of
        requests at once (running and queued), refused here beyond it.
        """
        self._timeouts = dict(timeouts or {})
        if handles is not None:
            known = {name: h for name, h in self._handles.items() if h.source is handles.get(name)}
            self._handles = {
                name: known.get(name) or _ModelHandles(h, self._replica_wait_s) for name, h in handles.items()
            }
        for name, handle in self._handles.items():
            handle.gather_by((gathering or {}).get(name))
            handle.relay.capacity = (capacities or {}).get(name)
        self._kinds = dict(kinds) if kinds is not None else dict.fromkeys(self._handles, "llm")
        self._routes = routes
        self._cohort_header = cohort_header

    async def dispatch(
        self, endpoint: Endpoint, request: Request, model: str | None = None
    ) -> Response:
        """Answers ``request`` at ``endpoint``; ``model`` is the path's model name
        for endpoints that carry it there (predict, infer) instead of in the body."""
        body = parse_json_object(await read_body(request, self._max_body_bytes, self._read_timeout_s))
        envelope = _envelope(endpoint, body) if model is None else None
        name = envelope.model if envelope is not None else str(model)
        user = envelope.user if envelope is not None else None
        stream = isinstance(envelope, STREAMING) and bool(envelope.stream)
        cohort = user or request.headers.get(self._cohort_header)
        api = api_key(request)
        # A model the key may not use is answered as one that does not exist.
        route = self._routes.resolve(name, cohort) if api is None or api.allows(name) else None
        if route is None:
            raise ModelNotFoundError.for_model(name)
        record: RequestRecord = request.state.record  # made by the observability middleware
        record.model, record.stream = name, stream
        _check_request_id(envelope, record.request_id)
        self._check_kind(endpoint, name, route)
        owner = api.id if api is not None else ""
        replica = None
        if isinstance(envelope, ResponsesEnvelope) and envelope.previous_response_id is not None:
            # Only the replica that stores the earlier response can continue it.
            route, replica = await self._holder(name, envelope.previous_response_id, "previous_response_id")
        if route.alias:
            self._metrics.assigned(name, route.target)
        request_id = record.request_id
        in_body = envelope is not None  # OpenAI bodies name their model
        admission = None
        if api is not None and api.limited:
            first = EngineRequest(
                endpoint, _routed(body, name, route.target, in_body), request_id, route.target, replica, owner
            )
            tokens = await self._most_tokens(first) if api.tpm is not None else 0
            admission = await admit(self.limiter, api, tokens, name)
        try:
            response = await self._forward(
                endpoint, body, name, in_body, route, request, record, stream, admission, (replica, owner)
            )
        except (asyncio.CancelledError, RequestTimeoutError):
            # The client left or the time ran out: a whole answer's call
            # settles on its own (with what the replica generated); a stream
            # not yet started keeps its reservation.
            if admission is not None and stream:
                admission.settle(None)
            raise
        except BaseException:
            if admission is not None:
                admission.settle(None if stream else Outcome())
            raise
        if admission is not None and not stream and record.outcome is not None and not _background(endpoint, body):
            admission.settle(record.outcome)
        # Otherwise the stream's end, an abandoned call's replica, or a
        # background response's end settles it.
        return response

    async def _most_tokens(self, call: EngineRequest) -> int:
        """What a token limit reserves for ``call``: the model's own count for
        LLMs, a bound from the input for embeddings, none for predictions."""
        kind = self._kinds.get(call.model, "llm")
        if call.endpoint == "messages_count":
            return 0  # counts tokens, generates none
        if kind == "llm":
            handles = self._handles[call.model]
            if handles.counter is None:
                handles.learn_counter()
            else:
                counts = handles.counter.prompt_tokens(call.endpoint, call.body)
                total = most_tokens(counts, call.body, handles.window) if counts is not None else None
                if total is not None:
                    return total
            try:  # the model's replica counts what the ingress cannot
                return await handles.relay.most_tokens(call)
            except Exception as exc:
                raise self._error(exc) from None
        return embedding_tokens(call.body) if call.endpoint == "embedding" else 0

    async def _forward(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        name: str,
        in_body: bool,
        route: Route,
        request: Request,
        record: RequestRecord,
        stream: bool,
        admission: Admission | None,
        pin: tuple[str | None, str] = (None, ""),
    ) -> Response:
        """``pin``: the replica that must answer (None: any) and the caller's key id."""
        request_id = record.request_id
        if route.shadow is not None:
            shadow_body = {**body, "model": route.shadow} if in_body else body
            self._mirror(EngineRequest(endpoint, shadow_body, request_id + "-shadow", route.shadow))
        candidates = (route.target, *route.fallbacks)
        for target in candidates:
            call = EngineRequest(endpoint, _routed(body, name, target, in_body), request_id, target, *pin)
            headers = {VARIANT_HEADER: target}
            if endpoint in ("messages", "messages_count"):
                headers[ANTHROPIC_REQUEST_ID] = request_id  # where Anthropic's clients read it
            if admission is not None:
                headers.update(admission.headers)
            record.variant = target
            timeout = self._timeouts.get(target)
            try:
                if not stream:
                    return await self._unary(
                        self._handles[target], call, request, headers, record, admission, timeout
                    )
                return await self._stream(self._handles[target], call, headers, record, admission, timeout)
            except GatewayError as error:
                error.extra_headers.update(headers)
                # Fallback only for failures of ours, before any byte was sent, with time left.
                if error.status_code < 500 or target == candidates[-1] or isinstance(error, RequestTimeoutError):
                    raise
                logger.warning(
                    "request %s: %s failed before its first byte (%s): trying the next variant",
                    request_id,
                    target,
                    error.code,
                )
        raise AssertionError("unreachable: the last candidate raises or returns")

    async def _holder(self, name: str, response_id: str, param: str) -> tuple[Route, str]:
        """The route to the variant of ``name`` whose replica stores
        ``response_id``, and that replica's id; 404 when none does (the id
        was not made here, or its replica has stopped)."""
        replica = relay.response_replica(response_id)
        model = await self._holding(self._routes.members(name), replica) if replica is not None else None
        if model is None or replica is None:
            raise ResponseNotFoundError.for_id(response_id, param)
        return self._routes.pinned(name, model), replica

    async def _holding(self, models: list[str], replica: str) -> str | None:
        """Which of ``models`` (LLMs among them) has the replica ``replica``:
        first among the replicas this ingress knows, then asking Serve."""
        llms = [model for model in models if self._kinds.get(model, "llm") == "llm" and model in self._handles]
        for model in llms:
            if self._handles[model].relay.knows(replica):
                return model
        for model in llms:
            try:
                if await self._handles[model].relay.holds(replica):
                    return model
            except ServiceUnavailableError:
                continue  # no replica of it runs: none of them stores it
        return None

    async def stored(self, endpoint: Endpoint, request: Request, response_id: str) -> Response:
        """``GET /v1/responses/{id}`` (``responses_retrieve``) or
        ``POST /v1/responses/{id}/cancel`` (``responses_cancel``): answered by
        the replica that stores the response, for the key that made it."""
        body: dict[str, Any] = {"response_id": response_id}
        if endpoint == "responses_retrieve":
            body.update(_retrieve_query(request))
        else:
            await read_body(request, self._max_body_bytes, self._read_timeout_s)  # none is expected
        api = api_key(request)
        replica = relay.response_replica(response_id)
        allowed = [model for model in self._handles if api is None or api.allows(model)]
        target = await self._holding(allowed, replica) if replica is not None else None
        if target is None:
            raise ResponseNotFoundError.for_id(response_id, "response_id")
        stream = bool(body.get("stream"))
        record: RequestRecord = request.state.record
        record.model = record.variant = target
        record.stream = stream
        admission = await admit(self.limiter, api, 0, target) if api is not None and api.limited else None
        call = EngineRequest(endpoint, body, record.request_id, target, replica, api.id if api else "")
        headers = {VARIANT_HEADER: target, **(admission.headers if admission is not None else {})}
        handles = self._handles[target]
        try:
            if stream:
                response = await self._stream(handles, call, headers, record, admission, None)
            else:
                response = await self._unary(handles, call, request, headers, record, admission, None)
        except BaseException:
            if admission is not None:
                admission.settle(Outcome())
            raise
        if admission is not None and not stream:
            admission.settle(record.outcome)
        return response

    def _check_kind(self, endpoint: Endpoint, name: str, route: Route) -> None:
        kind = self._kinds.get(route.target, "llm")
        if kind not in ENDPOINT_KINDS[endpoint]:
            path = ENDPOINT_PATHS[endpoint].format(model=name)
            raise ModelNotSupportedError(
                f"The model `{name}` ({kind}) does not serve {path}.",
                param="model",
            )

    def _mirror(self, call: EngineRequest) -> None:
        """Sends a copy in the background and discards the answer."""
        task = asyncio.create_task(self._shadow_call(call))
        self._shadow_calls.add(task)  # keep a reference until it is done
        task.add_done_callback(self._shadow_calls.discard)

    async def _shadow_call(self, call: EngineRequest) -> None:
        handles = self._handles[call.model]
        try:
            if call.stream:
                stream = await handles.relay.open(call)
                async for _ in stream.chunks():
                    pass
            elif self._kinds.get(call.model, "llm") == "llm":
                await handles.relay.call(call)
            else:
                await handles.unary.remote(call)
        except Exception as exc:  # noqa: BLE001 - a shadow's failure is only worth a log line
            logger.info("shadow request to %s failed: %s", call.model, exc)

    async def _unary(
        self,
        handles: _ModelHandles,
        call: EngineRequest,
        request: Request,
        headers: dict[str, str],
        record: RequestRecord,
        admission: Admission | None = None,
        timeout: float | None = None,
    ) -> Response:
        waited = time.perf_counter()
        # Who settles the key's reservation if the client leaves: the relay,
        # once the replica says what was generated; else at once, keeping it.
        abandoned = admission.settle if admission is not None else None
        llm = self._kinds.get(call.model, "llm") == "llm"
        if not llm and not handles.running.fresh():
            try:
                await handles.running.ready()
            finally:
                record.model_wait_s += time.perf_counter() - waited
            waited = time.perf_counter()
        if handles.gather is not None:
            response = answer = handles.gather.submit(call)
        elif llm:
            later = self._later(record, admission) if _background(call.endpoint, call.body) else None
            response = answer = asyncio.ensure_future(handles.relay.call(call, abandoned, later))
            abandoned = None
        else:
            response = handles.unary.remote(call)
            answer = asyncio.ensure_future(_result(response))
        hang_up = asyncio.ensure_future(_disconnected(request))
        # Serve's router holds a call while the model has no running replica:
        # a classical call is given up when that lasts (the relay bounds LLMs').
        stalled = None if llm else handles.running.stalled()
        waiting = {answer, hang_up} if stalled is None else {answer, hang_up, stalled}
        left = expired = gone = False
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            expired = not done
            gone = stalled is not None and stalled.done() and not answer.done()
        finally:
            # Reached unanswered when the client left (seen here, or by the
            # server, which then cancels this request's task), the time ran
            # out or no replica is running. Either way, cancelling the call aborts
            # the engine request (a gathered request is dropped from its group,
            # or its answer ignored).
            hang_up.cancel()
            if stalled is not None:
                stalled.cancel()
            record.model_wait_s += time.perf_counter() - waited
            if not answer.done():
                left = not expired and not gone
                response.cancel()
                answer.cancel()
                if abandoned is not None:
                    abandoned(None)
        if gone:
            assert stalled is not None  # it only ever ends with the 503
            raise stalled.exception()  # type: ignore[misc]
        if expired:
            raise _timed_out(timeout)
        if left:
            return Response(status_code=499)
        try:
            reply: Reply = answer.result()
        except Exception as exc:
            error = self._error(exc)
            if not llm and type(error) is ServiceUnavailableError:
                handles.running.lost()  # its replica may be gone: look before the next call
            raise error from None
        if not llm:
            handles.running.seen()
        self._answered(record, reply.outcome)
        return Response(reply.body, media_type="application/json", headers=headers)

    async def _stream(
        self,
        handles: _ModelHandles,
        call: EngineRequest,
        headers: dict[str, str],
        record: RequestRecord,
        admission: Admission | None = None,
        timeout: float | None = None,
    ) -> Response:
        waited = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + timeout if timeout is not None else None
        try:
            async with asyncio.timeout_at(deadline):
                stream = await handles.relay.open(call)
        except TimeoutError:
            raise _timed_out(timeout) from None
        except Exception as exc:
            # Known before any byte left: a plain HTTP error, not a 200 stream.
            raise self._error(exc) from None
        finally:
            record.model_wait_s += time.perf_counter() - waited

        if admission is not None:
            stream.when_ended(admission.settle)  # also a stream the client left
        if _background(call.endpoint, call.body):  # left early, it still generates to its end
            stream.outcome_wait_s = BACKGROUND_OUTCOME_S
        relayed = self._relay(stream, call.endpoint, record, deadline, timeout)
        return RelayResponse(relayed, headers, closed=stream.close)

    def _later(self, record: RequestRecord, admission: Admission | None) -> Callable[[Outcome | None], None]:
        """What counts a background response's outcome, once its replica has finished it."""

        def finished(outcome: Outcome | None) -> None:
            if outcome is not None:
                self._metrics.answered(record.model, record.variant, outcome, record.key)
            if admission is not None:
                admission.settle(outcome)

        return finished

    def _answered(self, record: RequestRecord, outcome: Outcome) -> None:
        record.outcome = outcome
        self._metrics.answered(record.model, record.variant, outcome, record.key)

    async def _relay(
        self,
        stream: RelayedStream,
        endpoint: Endpoint,
        record: RequestRecord,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """Yields the stream's bytes as they arrive; its outcome is counted once
        the last of them has been handed to the client. A client that leaves
        closes the relay, which aborts the engine request; so does the
        ``deadline`` (loop time), and the client then gets an error frame."""
        chunks = stream.chunks()
        error: GatewayError | None = None
        last = b""  # the latest read: a Responses error event is numbered after it
        try:
            if deadline is None:
                async for chunk in chunks:
                    last = chunk
                    yield chunk
            else:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):  # around the read, not the yield
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    last = chunk
                    yield chunk
        except StreamCutError:
            error = ServiceUnavailableError("The model stopped while serving the request.")
        except TimeoutError:
            error = _timed_out(timeout)
        finally:
            stream.close()  # at once, even where the client's hang-up left this unfinished
        if error is not None:
            record.error, record.late_status = error.code, error.status_code
            yield sse.stream_error(endpoint, error, sse.next_sequence_number(last))
            return
        if stream.outcome is not None:
            if stream.outcome.error is not None:  # the model ended the stream with an error frame
                record.error, record.late_status = stream.outcome.error, stream.outcome.error_status
            self._answered(record, stream.outcome)

    def _error(self, exc: BaseException) -> GatewayError:
        return as_gateway_error(exc, retry_after_s=self._retry_after_s)


def _background(endpoint: Endpoint, body: dict[str, Any]) -> bool:
    """Whether ``body`` asks for a background response (Responses API): one
    generated on after its answer, to be retrieved later."""
    return endpoint == "responses" and body.get("background") is True


def _retrieve_query(request: Request) -> dict[str, Any]:
    """``stream`` and ``starting_after`` of a ``GET /v1/responses/{id}``, checked."""
    query: dict[str, Any] = {}
    stream = request.query_params.get("stream")
    if stream is not None:
        if stream.lower() not in ("true", "false"):
            raise InvalidRequestError("`stream` must be `true` or `false`.", param="stream")
        query["stream"] = stream.lower() == "true"
    after = request.query_params.get("starting_after")
    if after is not None:
        if not after.isdigit():
            raise InvalidRequestError("`starting_after` must be a whole number.", param="starting_after")
        query["starting_after"] = int(after)
    return query


def _timed_out(timeout: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"The model did not finish within this gateway's limit of {timeout:g} s; the request was stopped."
    )


def _routed(body: dict[str, Any], name: str, target: str, in_body: bool) -> dict[str, Any]:
    """The body a variant gets: an OpenAI body names the concrete model."""
    return {**body, "model": target} if in_body and target != name else body


_ENVELOPES: dict[str, type[ModelEnvelope]] = {
    "chat": RequestEnvelope, "completion": RequestEnvelope, "responses": ResponsesEnvelope,
    "messages": MessagesEnvelope,
}
STREAMING = (RequestEnvelope, ResponsesEnvelope, MessagesEnvelope)


def _envelope(endpoint: Endpoint, body: dict[str, Any]) -> ModelEnvelope:
    """The routing fields of an OpenAI body; only chat and completions stream."""
    schema = _ENVELOPES.get(endpoint, ModelEnvelope)
    try:
        return schema.of(body)
    except ValidationError as exc:
        raise InvalidRequestError.from_validation(exc) from None


async def _result(response: Any) -> Reply:
    return await response  # type: ignore[no-any-return]


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request's body; raises RequestTooLargeError (413) past ``limit``
    bytes, before reading more than that (at once when content-length says
    so), and RequestReadTimeoutError (408) when it has not all arrived
    within ``timeout_s`` (a slow or stalled client)."""
    too_large = RequestTooLargeError(
        f"The request body is larger than this gateway accepts ({limit} bytes)."
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                parts.append(chunk)
    except TimeoutError:
        raise RequestReadTimeoutError(
            f"The request body did not arrive within {timeout_s:g} seconds."
        ) from None
    return b"".join(parts)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises InvalidRequestError otherwise."""
    try:
        # Strict UTF-8 (json.loads of bytes would let encoded surrogates through).
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from None
    except RecursionError:
        raise InvalidRequestError("The JSON body of your request is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    # Now an unpaired surrogate can only come from a \uD800-\uDFFF escape,
    # so bodies without one are not walked.
    if _SURROGATE_ESCAPE.search(raw) is not None:
        try:
            found = _unpaired_surrogate(body, "")
        except RecursionError:
            raise InvalidRequestError("The JSON body of your request is nested too deeply.") from None
        if found is not None:
            where, char = found
            raise InvalidRequestError(
                f"The JSON body of your request holds an unpaired surrogate (\\u{char:04x}) "
                f"in {where}; strings must be valid Unicode.",
                param=where.removeprefix("a key of ").removeprefix("a key") or None,
            )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(value: Any, path: str) -> tuple[str, int] | None:
    """Where in ``value`` the first string (or key) that is not valid Unicode
    is, and the surrogate it holds; None when every string is valid."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, ord(value[exc.start])
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unpaired_surrogate(key, f"a key of {path}" if path else "a key")
            found = found or _unpaired_surrogate(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unpaired_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _check_request_id(envelope: ModelEnvelope | None, request_id: str) -> None:
    """Refuses a body ``request_id`` (vLLM's) other than the request's own id:
    ids of answers, logs and metrics all use that one, so another would be
    dropped without a word."""
    given = getattr(envelope, "request_id", None)
    if given is not None and given != request_id:
        raise InvalidRequestError(
            f"The body's `request_id` ({given!r}) is not this request's id ({request_id!r}). "
            "Send your id as the `x-request-id` header: it then names the request "
            "everywhere (response ids, logs, metrics).",
            param="request_id",
        )
