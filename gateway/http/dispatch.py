"""Forwards OpenAI requests to model replicas and shapes the HTTP response."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from gateway import sse
from gateway.errors import GatewayError, InvalidRequestError, ModelNotFoundError
from gateway.http.handlers import as_gateway_error
from gateway.protocol.engine import Endpoint, EngineRequest
from gateway.protocol.envelope import RequestEnvelope
from gateway.routing.table import RouteTable

logger = logging.getLogger(__name__)

VARIANT_HEADER = "x-gateway-variant"


class _ModelHandles:
    """Per model, the two handle methods the hot path calls, made once.

    ``handle.options(...)`` builds a new handle each call: doing it per request
    costs measurable time, so both variants are cached here.
    """

    def __init__(self, handle: Any) -> None:
        self.unary = handle.options(method_name="generate")
        self.stream = handle.options(method_name="generate_stream", stream=True)


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
    ) -> None:
        self._routes = routes
        self._handles = {name: _ModelHandles(h) for name, h in handles.items()}
        self._retry_after_s = retry_after_s
        self._cohort_header = cohort_header
        self._shadow_calls: set[asyncio.Task[None]] = set()

    @property
    def routes(self) -> RouteTable:
        return self._routes

    def use_routes(self, routes: RouteTable, cohort_header: str) -> None:
        """Routes requests that arrive from now on with ``routes``."""
        self._routes = routes
        self._cohort_header = cohort_header

    async def dispatch(self, endpoint: Endpoint, request: Request) -> Response:
        body = parse_json_object(await request.body())
        try:
            envelope = RequestEnvelope.of(body)
        except ValidationError as exc:
            raise InvalidRequestError.from_validation(exc) from None
        key = envelope.user or request.headers.get(self._cohort_header)
        route = self._routes.resolve(envelope.model, key)
        if route is None:
            raise ModelNotFoundError.for_model(envelope.model)
        request_id: str = request.state.request_id
        if route.shadow is not None:
            self._mirror(EngineRequest(endpoint, {**body, "model": route.shadow}, request_id + "-shadow"))
        candidates = (route.target, *route.fallbacks)
        for target in candidates:
            routed = body if target == envelope.model else {**body, "model": target}
            call = EngineRequest(endpoint, routed, request_id)
            headers = {VARIANT_HEADER: target}
            try:
                if not envelope.stream:
                    return await self._unary(self._handles[target], call, request, headers)
                return await self._stream(self._handles[target], call, headers)
            except GatewayError as error:
                error.extra_headers.update(headers)
                # Fallback only for failures of ours, before any byte was sent.
                if error.status_code < 500 or target == candidates[-1]:
                    raise
                logger.warning(
                    "%s failed before its first byte (%s): trying the next variant",
                    target,
                    error.code,
                )
        raise AssertionError("unreachable: the last candidate raises or returns")

    def _mirror(self, call: EngineRequest) -> None:
        """Sends a copy in the background and discards the answer."""
        task = asyncio.create_task(self._shadow_call(call))
        self._shadow_calls.add(task)  # keep a reference until it is done
        task.add_done_callback(self._shadow_calls.discard)

    async def _shadow_call(self, call: EngineRequest) -> None:
        handles = self._handles[call.body["model"]]
        try:
            if call.stream:
                async for _ in handles.stream.remote(call):
                    pass
            else:
                await handles.unary.remote(call)
        except Exception as exc:  # noqa: BLE001 - a shadow's failure is only worth a log line
            logger.info("shadow request to %s failed: %s", call.body["model"], exc)

    async def _unary(
        self, handles: _ModelHandles, call: EngineRequest, request: Request, headers: dict[str, str]
    ) -> Response:
        response = handles.unary.remote(call)
        answer = asyncio.ensure_future(_result(response))
        hang_up = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
        if not answer.done():
            # The client left: cancelling the call aborts the engine request.
            response.cancel()
            answer.cancel()
            return Response(status_code=499)
        try:
            payload = answer.result()
        except Exception as exc:
            raise self._error(exc) from None
        return Response(payload, media_type="application/json", headers=headers)

    async def _stream(
        self, handles: _ModelHandles, call: EngineRequest, headers: dict[str, str]
    ) -> Response:
        stream = handles.stream.remote(call)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = sse.DONE
        except Exception as exc:
            # Known before any byte left: a plain HTTP error, not a 200 stream.
            raise self._error(exc) from None
        return StreamingResponse(
            self._relay(first, stream), media_type=sse.MEDIA_TYPE, headers=headers
        )

    async def _relay(self, first: bytes, stream: Any) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield first
            async for chunk in stream:
                yield chunk
            finished = True
        except Exception as exc:
            finished = True
            yield sse.error_frames(self._error(exc).to_dict())
        finally:
            if not finished:
                # The client went away: stop the replica, which aborts the engine request.
                stream.cancel()

    def _error(self, exc: BaseException) -> GatewayError:
        return as_gateway_error(exc, retry_after_s=self._retry_after_s)


async def _result(response: Any) -> bytes:
    return await response  # type: ignore[no-any-return]


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises InvalidRequestError otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return body
