"""Forwards a request to the model its plan names (``gateway.http.plan``), with the
fallback, shadow, timeout, key limits and hang-ups around the call;
``gateway.http.answers`` shapes and counts what comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from gateway.auth.local import LocalLimiter
from gateway.auth import prompt_count
from gateway.auth.prompt_count import most_tokens
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotSupportedError,
    RequestTimeoutError,
    ResponseNotFoundError,
    ServiceUnavailableError,
    ShuttingDownError,
)
from gateway.http.answers import Answers
from gateway.http.auth import api_key
from gateway.http.body import parse_json_object, read_body
from gateway.http.client_connection import disconnected
from gateway.http.deadlines import Stopping
from gateway.http.endpoints import ENDPOINTS
from gateway.http.handlers import as_gateway_error
from gateway.http.limits import (
    Admission,
    CountSlots,
    admit,
    embedding_tokens,
    refuse_early,
    unbudgeted,
    usage_headers,
)
from gateway.http.plan import plan
from gateway.http.relay_stream import RelayedStream
from gateway.http.serving import LLMClient, ServedModel, ServingTable
from gateway.http.shadows import Shadows
from gateway.http.stored import allowed_llms, holder, holding, input_items_query, made_by, retrieve_query
from gateway.leaving import CallerLeft, unless_caller_leaves
from gateway.metrics.recorder import GatewayMetrics, RequestRecord
from gateway.protocol import relay
from gateway.protocol.engine import COUNTING, Endpoint, EngineRequest, Outcome, Reply
from gateway.protocol.envelope import ModelEnvelope, ResponsesEnvelope
from gateway.routing.table import Route, RouteTable

logger = logging.getLogger(__name__)

VARIANT_HEADER = "x-gateway-variant"


class ModelDispatcher:
    """Parses just what routing needs, picks the model, forwards to it.

    Serves with one ``ServingTable`` at a time (``serve`` swaps it whole);
    each request keeps the table it arrived under. Raises
    ``gateway.errors.GatewayError`` for anything known before the first
    byte; an error after it ends the stream with an SSE error frame.
    """

    def __init__(
        self,
        retry_after_s: int,
        metrics: GatewayMetrics | None = None,
        limiter: Any = None,
        max_body_bytes: int = 32 * 1024 * 1024,
        read_timeout_s: float | None = None,
        table: ServingTable | None = None,
    ) -> None:
        self._retry_after_s = retry_after_s
        self._max_body_bytes = max_body_bytes
        self._read_timeout_s = read_timeout_s
        # Where limited API keys reserve (``gateway.auth.limiter``).
        self.limiter = limiter if limiter is not None else LocalLimiter()
        self._metrics = metrics if metrics is not None else GatewayMetrics()
        # This ingress replica's stop, which ends the requests it still runs in time (README).
        self.stopping = Stopping()
        self._answers = Answers(self._metrics, self.stopping)
        self._shadows = Shadows()
        self._counts = CountSlots()
        self._table = table if table is not None else ServingTable(RouteTable([]))

    @property
    def table(self) -> ServingTable:
        """The table requests that arrive now are served with."""
        return self._table

    @property
    def routes(self) -> RouteTable:
        return self._table.routes

    def serve(self, table: ServingTable) -> None:
        """Serves requests that arrive from now on with ``table``."""
        self._table = table

    async def dispatch(
        self, endpoint: Endpoint, request: Request, model: str | None = None
    ) -> Response:
        """Answers ``request`` at ``endpoint``; ``model`` is the path's model name
        for endpoints that carry it there (predict, infer) instead of in the body."""
        spec = ENDPOINTS[endpoint]
        raw = await read_body(request, self._max_body_bytes, self._read_timeout_s, expect_json=True)
        body = parse_json_object(raw)
        # This request's table, to its end: taken once its body is in (a slow
        # upload must not be routed by a table a live change has since replaced).
        table = self._table
        api = api_key(request)
        record: RequestRecord = request.state.record  # made by the observability middleware
        try:
            planned = plan(table, spec, body, request.headers, api, model)
        except ModelNotSupportedError:
            # A model served here, asked at the wrong endpoint: counted and logged under its name.
            record.model = model if model is not None else str(body.get("model"))
            raise
        name, route, stream, envelope = planned.name, planned.route, planned.stream, planned.envelope
        record.model, record.stream = name, stream
        try:
            _check_request_id(envelope, record.request_id)
        except GatewayError as error:  # (refused after routing: the variant is said, as on any such error)
            error.extra_headers.setdefault(VARIANT_HEADER, route.target)
            raise
        owner = api.id if api is not None else ""
        replica = None
        if isinstance(envelope, ResponsesEnvelope) and envelope.previous_response_id is not None:
            # Only the replica that stores the earlier response can continue it.
            previous = envelope.previous_response_id
            route, replica = await holder(table, name, previous, "previous_response_id", api, record.request_id)
        request_id = record.request_id
        in_body = envelope is not None  # OpenAI bodies name their model
        admission = None
        if api is not None and api.limited:
            try:
                tokens = 0
                if api.tpm is not None:
                    await refuse_early(self.limiter, api, name)
                    call = EngineRequest(endpoint, body, request_id, route.target, replica, owner)
                    async with self._counts.counting(api, self.limiter, name):
                        tokens = await self._reserved_tokens(table, route, call, name, in_body, len(raw))
                unbounded = unbudgeted(endpoint, body) if tokens else None
                admission = await admit(self.limiter, api, tokens, name, unbounded)
            except GatewayError as error:  # (refused after routing: the variant is said, as on any such error)
                error.extra_headers.setdefault(VARIANT_HEADER, route.target)
                raise
        if route.alias and replica is None and endpoint not in COUNTING:
            # (drawn by the A/B chooser, admitted; not pinned by a conversation; a request for an answer,
            # not a count or a tokenizer's, which would skew the split the experiment reads)
            self._metrics.assigned(name, route.target)
        try:
            response = await self._forward(
                table, endpoint, body, name, in_body, route, request, record, stream, admission, (replica, owner)
            )
        except (asyncio.CancelledError, RequestTimeoutError, ShuttingDownError):
            # The client left or the time ran out (the model's or the replica's stop): a whole answer's
            # call settles on its own, and so does a stream not yet started (with what the replica
            # generated, where it says so in time).
            if admission is not None and stream:
                admission.left_unstarted()
            raise
        except BaseException:
            # Refused, or failed before its first byte: nothing generated
            # was delivered, and no tokens are counted (as OpenAI bills them).
            if admission is not None:
                admission.settle(Outcome())
            raise
        if admission is not None and not stream and record.outcome is not None and not _background(endpoint, body):
            admission.settle(record.outcome)
        # Otherwise the stream's end, an abandoned call's replica, or a
        # background response's end settles it.
        return response

    async def _reserved_tokens(
        self, table: ServingTable, route: Route, call: EngineRequest, name: str, in_body: bool, size: int
    ) -> int:
        """What a token limit reserves for ``call`` (its body as sent, of
        ``size`` bytes), counted by the first of the route's variants that
        can: one whose model has no running replica is its fallback's to
        serve, and to count."""
        candidates = (route.target, *route.fallbacks)
        for target in candidates:
            routed = dataclasses.replace(call, body=_routed(call.body, name, target, in_body), model=target)
            try:
                return await self._most_tokens(table.model(target), routed, size)
            except GatewayError as error:
                error.extra_headers.setdefault(VARIANT_HEADER, target)  # the variant whose count it was
                if not isinstance(error, ServiceUnavailableError) or isinstance(error, ShuttingDownError):
                    raise
                if target == candidates[-1]:
                    raise
        raise AssertionError("unreachable: the last candidate returns or raises")

    async def _most_tokens(self, model: ServedModel, call: EngineRequest, size: int) -> int:
        """What a token limit reserves for ``call``: the model's own count for
        LLMs, a bound from the input for embedding models (by any endpoint),
        none for other predictions."""
        if call.endpoint in COUNTING:
            return 0  # counts tokens, generates none
        client = model.client
        if isinstance(client, LLMClient):
            if client.counter is None:
                client.learn_counter()
            else:
                counts = await prompt_count.count(client.counter, call.endpoint, call.body, size)
                total = most_tokens(counts, call.body, client.window, call.endpoint) if counts is not None else None
                if total is not None:
                    return total
            # The model's replica counts what the ingress cannot, within the
            # model's request_timeout_s (a count is part of the request) and the stop.
            deadline = asyncio.get_running_loop().time() + model.timeout_s if model.timeout_s is not None else None
            try:
                async with self.stopping.bounded(deadline):
                    return await client.relay.most_tokens(call)
            except TimeoutError:
                raise self.stopping.error(deadline, model.timeout_s) from None
            except Exception as exc:
                raise self._error(exc) from None
        if model.kind != "embedding":
            return 0
        window = await client.window()  # (no input holds more: a longer one is refused)
        if size <= prompt_count.INLINE_BYTES:
            return embedding_tokens(call.endpoint, call.body, window)
        # (Millions of inputs take a second to walk: not on the loop every request shares.)
        return await asyncio.to_thread(embedding_tokens, call.endpoint, call.body, window)

    async def _forward(
        self,
        table: ServingTable,
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
        if route.shadow is not None and endpoint not in COUNTING:  # (a count is no request to mirror)
            shadow_body = {**body, "model": route.shadow} if in_body else body
            if endpoint == "responses":
                # Its answer is dropped: kept, it would take a stored response's place
                # from the shadow model's own users; in the background, outlive its bound.
                shadow_body = {**shadow_body, "store": False, "background": False}
            self._shadows.send(table.model(route.shadow), EngineRequest(endpoint, shadow_body, request_id + "-shadow", route.shadow))
        candidates = (route.target, *route.fallbacks)
        for target in candidates:
            call = EngineRequest(endpoint, _routed(body, name, target, in_body), request_id, target, *pin)
            headers = {VARIANT_HEADER: target}
            if admission is not None:
                headers.update(admission.headers)
            record.variant = target
            model = table.model(target)
            try:
                if not stream:
                    return await self._unary(model, call, request, headers, record, admission, model.timeout_s)
                return await self._stream(model, call, request, headers, record, admission, model.timeout_s)
            except GatewayError as error:
                error.extra_headers.update(headers)
                # Fallback only for failures of ours, before any byte was sent, with time left.
                spent = isinstance(error, (RequestTimeoutError, ShuttingDownError))
                if error.status_code < 500 or target == candidates[-1] or spent:
                    raise
                logger.warning(
                    "request %s: %s failed before its first byte (%s): trying the next variant",
                    request_id,
                    target,
                    error.code,
                )
        raise AssertionError("unreachable: the last candidate raises or returns")

    async def stored(self, endpoint: Endpoint, request: Request, response_id: str) -> Response:
        """``GET /v1/responses/{id}`` (``responses_retrieve``),
        ``GET /v1/responses/{id}/input_items`` (``responses_input_items``),
        ``POST /v1/responses/{id}/cancel`` (``responses_cancel``) or
        ``DELETE /v1/responses/{id}`` (``responses_delete``): answered by
        the replica that stores the response, for the key that made it."""
        body: dict[str, Any] = {"response_id": response_id}
        if endpoint == "responses_retrieve":
            body.update(retrieve_query(request))
        elif endpoint == "responses_input_items":
            body.update(input_items_query(request))
        else:
            await read_body(request, self._max_body_bytes, self._read_timeout_s)  # none is expected
        table = self._table
        api = api_key(request)
        replica = relay.response_replica(response_id)
        allowed = allowed_llms(table, api)
        model = await holding(allowed, replica) if replica is not None else None
        if model is None or replica is None:
            raise ResponseNotFoundError.for_id(response_id, "response_id")
        owner = api.id if api else ""
        model = await made_by(allowed, model, response_id, replica, request.state.record.request_id, owner)
        target = model.name
        stream = bool(body.get("stream"))
        record: RequestRecord = request.state.record
        record.model = record.variant = target
        record.stream = stream
        headers = {VARIANT_HEADER: target}
        if api is not None and api.limited:
            # Counted against none of the key's limits: it generates nothing, and a key
            # whose background response holds its last place must still reach it to cancel it.
            headers.update(await usage_headers(self.limiter, api))
        call = EngineRequest(endpoint, body, record.request_id, target, replica, owner)
        # Not bounded by the model's request_timeout_s: retrieving is not generating.
        if stream:
            return await self._stream(model, call, request, headers, record, None, None)
        return await self._unary(model, call, request, headers, record, None, None)

    async def _unary(
        self,
        model: ServedModel,
        call: EngineRequest,
        request: Request,
        headers: dict[str, str],
        record: RequestRecord,
        admission: Admission | None = None,
        timeout: float | None = None,
    ) -> Response:
        client = model.client
        waited = time.perf_counter()
        try:
            async with self.stopping.bounded(None):  # (a classical model's wait for a replica)
                await client.ready()
        except (asyncio.CancelledError, TimeoutError) as exc:
            if admission is not None:
                admission.settle(Outcome())  # it was sent nowhere
            if isinstance(exc, TimeoutError):
                raise self.stopping.error(None, None) from None
            raise
        except Exception as exc:  # (Serve's, for a deployment that is gone: 503, and a route's fallback)
            raise self._error(exc) from None
        finally:
            record.model_wait_s += time.perf_counter() - waited
        waited = time.perf_counter()
        # Who settles the key's reservation if the client leaves: the model's
        # client (an LLM's once its replica says what was generated). A call
        # given up because the model has no running replica ran nowhere: its
        # reservation goes on to the next variant, if the route has one.
        gone = False

        def abandoned(outcome: Outcome | None) -> None:
            if admission is not None and not gone:
                admission.settle(outcome)

        later = self._answers.later(record, admission) if _background(call.endpoint, call.body) else None
        answer = client.unary(call, abandoned if admission is not None else None, later)
        hang_up = asyncio.ensure_future(disconnected(request.receive))
        # Serve's router holds a call while the model has no running replica:
        # a classical call is given up when that lasts (the relay bounds LLMs').
        stalled = client.stalled()
        waiting: set[asyncio.Future[Any]] = {answer, hang_up} if stalled is None else {answer, hang_up, stalled}
        left = expired = False
        deadline = asyncio.get_running_loop().time() + timeout if timeout is not None else None
        try:
            try:
                async with self.stopping.bounded(deadline):
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                expired = not answer.done()  # (an answer just in is taken)
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
                answer.cancel()
                if left and admission is not None and later is None:
                    admission.leave()  # its place is free at once; the replica settles what it generated
        if gone:
            assert stalled is not None  # it only ever ends with the 503
            raise stalled.exception()  # type: ignore[misc]
        if expired:
            raise self.stopping.error(deadline, timeout)
        if left:
            return Response(status_code=499)
        try:
            reply: Reply = answer.result()
        except Exception as exc:
            error = self._error(exc)
            if type(error) is ServiceUnavailableError:
                client.lost()
            raise error from None
        client.answered()
        return self._answers.whole(record, reply, headers)

    async def _stream(
        self,
        model: ServedModel,
        call: EngineRequest,
        request: Request,
        headers: dict[str, str],
        record: RequestRecord,
        admission: Admission | None = None,
        timeout: float | None = None,
    ) -> Response:
        client = model.client
        if not isinstance(client, LLMClient):  # only LLMs' endpoints stream (EndpointSpec.kinds)
            raise ModelNotSupportedError(f"The model `{model.name}` does not stream.", param="model")
        waited = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + timeout if timeout is not None else None
        try:
            async with self.stopping.bounded(deadline):
                # The gateway's own front door tells a hang-up only through `receive`.
                # Given up before a replica was found: nothing generated, nothing charged.
                unsent = admission.settle if admission is not None else None
                stream = await unless_caller_leaves(
                    client.stream(call, unsent), disconnected(request.receive), RelayedStream.close
                )
        except CallerLeft:  # before its first byte: the engine request is aborted
            if admission is not None:
                admission.left_unstarted()
            return Response(status_code=499)
        except TimeoutError:
            raise self.stopping.error(deadline, timeout) from None
        except Exception as exc:
            # Known before any byte left: a plain HTTP error, not a 200 stream.
            raise self._error(exc) from None
        finally:
            record.model_wait_s += time.perf_counter() - waited

        if _background(call.endpoint, call.body):
            # It generates to its end, its client there or not: its outcome
            # is counted and settled then, and its key's place held until then.
            # request_timeout_s bounded its start only: it would stop the
            # client's reading, not the response (README).
            stream.when_ended(self._answers.generated_on(record, admission))
            stream.generates_on()
            deadline = timeout = None
        elif admission is not None:
            # Also a stream the client left; its place is free at once.
            stream.when_ended(admission.settle, admission.leave)
        return self._answers.streamed(stream, call.endpoint, record, headers, deadline, timeout)

    def _error(self, exc: BaseException) -> GatewayError:
        return as_gateway_error(exc, retry_after_s=self._retry_after_s)


def _background(endpoint: Endpoint, body: dict[str, Any]) -> bool:
    """Whether ``body`` asks for a background response (Responses API): one
    generated on after its answer, to be retrieved later."""
    return endpoint == "responses" and body.get("background") is True


def _routed(body: dict[str, Any], name: str, target: str, in_body: bool) -> dict[str, Any]:
    """The body a variant gets: an OpenAI body names the concrete model."""
    return {**body, "model": target} if in_body and target != name else body



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
