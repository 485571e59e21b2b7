"""gateway/http/dispatch.py: forwarding and errors, with fake handles (hang-ups: test_dispatch_hang_ups)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from fastapi import FastAPI, Request
from fastapi.responses import Response
from httpx import ASGITransport, AsyncClient

from gateway import sse
from gateway.errors import InternalServerError, InvalidRequestError
from gateway.config import ModelKind
from gateway.http.dispatch import ModelDispatcher
from gateway.http.gather import Gathering
from gateway.http.serving import ClassicalClient, LLMClient, ServedModel, ServingTable
from gateway.http.handlers import install_handlers
from gateway.http.access_log import AccessLog
from gateway.http.observe import ObservabilityMiddleware, route_matcher
from gateway.metrics.recorder import GatewayMetrics
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from gateway.protocol.relay import RelayAddress
from gateway.routing.table import RouteTable
from models.llm.relay import StreamServer


COUNTED_TOKENS = 100


class FakeResponse:
    """Stands in for a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, result: Any, delay: float) -> None:
        self._result, self._delay = result, delay
        self.cancelled = False

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self._delay)
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplica:
    """A real relay port (models.llm.relay) that replays a scripted stream: bytes
    are frames, an exception is raised where it stands (first: before any
    byte), an Outcome is what the stream reports."""

    def __init__(self, handle: FakeHandle) -> None:
        self._handle = handle
        self.server = StreamServer(self.open_stream, "127.0.0.1", answer=self.answer, count=self.count)
        self.address: RelayAddress | None = None

    async def count(self, request: EngineRequest) -> int:
        """The most tokens a request may use, as the model counts them (a limited key's reservation)."""
        return COUNTED_TOKENS

    async def answer(self, request: EngineRequest, tally: Any = None) -> Reply:
        """A whole answer, as ``unary`` scripts it (bytes, a Reply or an error) after ``delay``;
        a cancelled one (the client left) is marked so."""
        h = self._handle
        h.calls.append(request)
        record = SimpleNamespace(cancelled=False)
        h.responses.append(record)
        try:
            await asyncio.sleep(h.delay)
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        if isinstance(h.unary, BaseException):
            raise h.unary
        return Reply(h.unary, Outcome()) if isinstance(h.unary, bytes) else h.unary

    async def open_stream(self, request: EngineRequest) -> tuple[AsyncIterator[bytes], Any]:
        """The scripted stream, its head ``head_delay`` later (a cancelled wait is marked so)."""
        self._handle.calls.append(request)
        if self._handle.head_delay:
            record = SimpleNamespace(cancelled=False)
            self._handle.responses.append(record)
            try:
                await asyncio.sleep(self._handle.head_delay)
            except asyncio.CancelledError:
                record.cancelled = True
                raise
        script = list(self._handle.stream)
        if script and isinstance(script[0], BaseException):
            raise script[0]
        outcome = next((item for item in script if isinstance(item, Outcome)), Outcome())

        async def frames() -> AsyncIterator[bytes]:
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, bytes):
                    yield item
                if isinstance(item, float):  # the engine between tokens
                    await asyncio.sleep(item)

        return frames(), lambda: outcome


class FakeHandle:
    def __init__(
        self, unary: Any = b"{}", stream: list[Any] | None = None, delay: float = 0, head_delay: float = 0
    ) -> None:
        self.unary, self.stream, self.delay, self.head_delay = unary, stream or [], delay, head_delay
        self.calls: list[Any] = []
        self.responses: list[Any] = []
        self.replica = FakeReplica(self)
        self.info: Any = None  # what ``info`` answers (None: as any other method)

    def options(self, **kwargs: Any) -> FakeMethod:
        return FakeMethod(self, kwargs.get("stream", False), kwargs.get("method_name", ""))

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        """As Serve's router: names the (one) replica and its metadata."""
        if self.replica.address is None:
            self.replica.address = await self.replica.server.start()
        yield SimpleNamespace(replica_metadata=self.replica.address.metadata())


class FakeMethod:
    def __init__(self, handle: FakeHandle, stream: bool, name: str) -> None:
        self._handle, self._stream, self._name = handle, stream, name

    def remote(self, call: Any = None) -> Any:
        h = self._handle
        if self._name == "info" and h.info is not None:
            return FakeResponse(h.info, 0)
        h.calls.append(call)
        if self._name == "generate_many" and isinstance(h.unary, BaseException):  # the whole call fails
            h.responses.append(FakeResponse(h.unary, h.delay))
            return h.responses[-1]
        if self._name == "generate_many":  # a group: one answer or error per request
            answers = [
                InvalidRequestError("bad input", param="input") if c.body.get("bad")
                else Reply(json.dumps({"echo": c.body["k"]}).encode(), Outcome())
                for c in call
            ]
            h.responses.append(FakeResponse(answers, h.delay))
            return h.responses[-1]
        unary = Reply(h.unary, Outcome()) if isinstance(h.unary, bytes) else h.unary
        response = FakeResponse(unary, h.delay)
        h.responses.append(response)
        return response


def make_app(handle: FakeHandle | None = None, **routing: Any) -> FastAPI:
    """An app whose dispatcher serves model "m" (``handle``) or, given
    ``handles`` and ``alias``, alias "r" over those handles."""
    handles: dict[str, FakeHandle] = routing.get("handles") or {"m": handle or FakeHandle()}
    aliases = {"r": routing["alias"]} if "alias" in routing else None
    metrics = GatewayMetrics()
    kinds: dict[str, ModelKind] = routing.get("kinds") or {}
    wait_s = routing.get("replica_wait_s", 5.0)
    models: dict[str, ServedModel] = {}
    for name, h in handles.items():
        kind = kinds.get(name, "llm")
        client = LLMClient(h, wait_s) if kind == "llm" else ClassicalClient(h, kind, wait_s)
        if "gathering" in routing and isinstance(client, ClassicalClient):
            client.gather_by(Gathering(*routing["gathering"][name]))
        models[name] = ServedModel(name, kind, client, routing.get("timeouts", {}).get(name))
    # Seeded: a request without a cohort goes to the same variant on every run.
    table = ServingTable(RouteTable(list(handles), aliases, random.Random(7)), "x-session-id", models)
    dispatcher = ModelDispatcher(retry_after_s=1, metrics=metrics, table=table)
    app = FastAPI()
    app.state.metrics = metrics
    app.state.dispatcher = dispatcher

    @app.post("/chat")
    async def chat(request: Request) -> Response:
        return await dispatcher.dispatch("chat", request)

    @app.post("/responses")
    async def responses(request: Request) -> Response:
        return await dispatcher.dispatch("responses", request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await dispatcher.dispatch("tokenize", request)

    @app.post("/predict/{model}")
    async def predict(model: str, request: Request) -> Response:
        return await dispatcher.dispatch("predict", request, model)

    install_handlers(app)
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=metrics,
        access_log=AccessLog("off"),
        route_of=route_matcher(app.router.routes, frozenset()),
    )
    return app


async def post(app: FastAPI, body: dict[str, Any]) -> Any:
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/chat", json=body)


async def test_body_goes_to_the_model_untouched_with_the_request_id() -> None:
    handle = FakeHandle(unary=b'{"ok":true}')
    body = {"model": "m", "messages": [], "vendor_extra": {"x": 1}}
    response = await post(make_app(handle), body)
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    call = handle.calls[0]
    assert call.body == body
    assert call.endpoint == "chat"
    assert call.request_id == response.headers["x-request-id"]


async def test_stream_relays_chunks_in_order() -> None:
    chunks = [sse.frame({"n": 1}), sse.frame({"n": 2}) + sse.DONE]
    response = await post(make_app(FakeHandle(stream=chunks)), {"model": "m", "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b"".join(chunks)


async def test_error_after_first_byte_ends_stream_with_error_frame_and_done() -> None:
    chunks = [sse.frame({"n": 1}), InternalServerError("engine died")]
    response = await post(make_app(FakeHandle(stream=chunks)), {"model": "m", "stream": True})
    assert response.status_code == 200
    payloads = sse.parse(response.content)
    assert payloads[0] == {"n": 1}
    assert payloads[1]["error"]["code"] == "internal_error"
    assert payloads[2] is None


async def test_error_before_first_byte_is_a_plain_http_error() -> None:
    chunks = [InternalServerError("no engine")]
    response = await post(make_app(FakeHandle(stream=chunks)), {"model": "m", "stream": True})
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")


async def test_concurrent_requests_to_a_gathering_model_share_calls_and_keep_their_answers() -> None:
    handle = FakeHandle(delay=0.05)
    app = make_app(handle, kinds={"m": "classifier"}, gathering={"m": (8, 1, None)})
    bodies = [{"k": i, "bad": i == 3} for i in range(6)]
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(*(client.post("/predict/m", json=b) for b in bodies))
    # The first leaves alone; the rest wait for it and leave together.
    assert [len(group) for group in handle.calls] == [1, 5]
    assert [c.body["k"] for group in handle.calls for c in group] == [0, 1, 2, 3, 4, 5]
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200]
    assert [r.json()["echo"] for i, r in enumerate(responses) if i != 3] == [0, 1, 2, 4, 5]
    assert responses[3].json()["error"]["message"] == "bad input"
    ids = {c.request_id for group in handle.calls for c in group}
    assert ids == {r.headers["x-request-id"] for r in responses}


class Restarting(FakeHandle):
    """A classical model's handle whose replica is down while ``up`` is clear:
    Serve's router then waits for one however long it takes."""

    def __init__(self) -> None:
        super().__init__(unary=b'{"predictions": [1]}')
        self.up = asyncio.Event()
        self.up.set()

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        assert _reserve is False, "looking for a running replica reserves none"
        await self.up.wait()
        yield SimpleNamespace(replica_metadata={})


PREDICT = {"instances": [[1]], "k": 7}


@pytest.fixture(params=[None, (8, 1, None)], ids=["one-by-one", "gathered"])
async def restarting(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Restarting, AsyncClient, bool]]:
    """A classifier "m" served by a Restarting handle (its calls gathered or
    not), with a 0.5 s replica wait; a client that has had one answer."""
    handle = Restarting()
    routing: dict[str, Any] = {"kinds": {"m": "classifier"}, "replica_wait_s": 0.5}
    if request.param is not None:
        routing["gathering"] = {"m": request.param}
    transport = ASGITransport(app=make_app(handle, **routing), raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/predict/m", json=PREDICT)).status_code == 200
        yield handle, client, request.param is not None


async def test_a_classical_model_with_no_running_replica_waits_at_most_replica_wait_s(
    restarting: tuple[Restarting, AsyncClient, bool],
) -> None:
    handle, client, gathering = restarting
    loop, body = asyncio.get_running_loop(), PREDICT
    handle.up.clear()  # the replica dies under a call; Serve has none running
    handle.unary = ActorDiedError()
    died = await client.post("/predict/m", json=body)
    assert died.status_code == 503 and died.headers["retry-after"]
    sent = len(handle.calls)
    started = loop.time()
    waiting = await asyncio.gather(*(client.post("/predict/m", json=body) for _ in range(3)))
    assert 0.45 <= loop.time() - started <= 2.5  # one shared look-up, bounded
    started = loop.time()
    later = await client.post("/predict/m", json=body)
    assert loop.time() - started < 0.3  # the model is still down: answered at once
    for answer in [*waiting, later]:
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"]["code"] == "service_unavailable"
        assert "No replica of the model is running" in answer.json()["error"]["message"]
    assert len(handle.calls) == sent  # none was handed to Serve's router to wait there
    handle.unary = b'{"predictions": [2]}'
    handle.up.set()  # a new replica is running
    await asyncio.sleep(0)  # one turn: the look-up still going on in the background sees it
    back = await client.post("/predict/m", json=body)
    assert back.status_code == 200 and back.json() == ({"echo": 7} if gathering else {"predictions": [2]})


async def test_a_classical_call_held_while_no_replica_runs_is_given_up_but_a_slow_one_is_not(
    restarting: tuple[Restarting, AsyncClient, bool],
) -> None:
    handle, client, gathering = restarting
    loop, body = asyncio.get_running_loop(), PREDICT
    # The replica dies silently; Serve's router holds the next call for a new one.
    handle.up.clear()
    handle.delay = 30
    started = loop.time()
    held = await client.post("/predict/m", json=body)
    assert 0.45 <= loop.time() - started <= 2.5
    assert held.status_code == 503 and held.headers["retry-after"]
    assert "No replica of the model is running" in held.json()["error"]["message"]
    for _ in range(100):  # given up with Serve too (a group, once its requests have all left)
        if handle.responses[-1].cancelled:
            break
        await asyncio.sleep(0.01)
    assert handle.responses[-1].cancelled
    handle.up.set()  # running again, but slower than replica_wait_s to answer
    handle.delay = 1.2
    await asyncio.sleep(0)  # one turn: the look-up still going on in the background sees it
    slow = await client.post("/predict/m", json=body)
    assert slow.status_code == 200


async def test_a_body_request_id_other_than_the_requests_own_is_refused_naming_the_variant() -> None:
    handle = FakeHandle()
    transport = ASGITransport(app=make_app(handle), raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        body = {"model": "m", "messages": [], "request_id": "theirs"}
        response = await client.post("/chat", json=body, headers={"x-request-id": "ours"})
    assert (response.status_code, response.json()["error"]["param"]) == (400, "request_id")
    assert response.headers["x-gateway-variant"] == "m"  # as every error raised once a variant is chosen
    assert handle.calls == []


@pytest.mark.parametrize("body", [{"model": "other"}, {"model": "m", "n": 0}])
async def test_bad_routing_fields_never_reach_a_model(body: dict[str, Any]) -> None:
    handle = FakeHandle()
    response = await post(make_app(handle), body)
    assert response.status_code in {400, 404}
    assert handle.calls == []


@pytest.mark.parametrize(
    ("n", "got"), [(False, "a boolean"), ("0", "a string"), ("500", "a string")]
)
async def test_a_routing_field_of_the_wrong_type_is_named_so_not_read_as_a_number(n: Any, got: str) -> None:
    # pydantic's lax reading made false and "0" a 0, "500" a 500: refused
    # for their value ("greater than or equal to 1"), not their type.
    handle = FakeHandle()
    response = await post(make_app(handle), {"model": "m", "n": n})
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"]) == (400, "n", "invalid_type")
    assert error["message"] == f"Invalid type for 'n': expected an integer, but got {got} instead."
    assert handle.calls == []
    assert (await post(make_app(handle), {"model": "m", "n": 2.0})).status_code == 200  # as vLLM takes it


async def test_a_stream_option_vllm_would_drop_is_refused_naming_it() -> None:
    # A misspelt include_usage left the usage chunk out without a word.
    handle = FakeHandle(stream=[sse.DONE])
    sent = {"model": "m", "stream": True, "stream_options": {"include_usgae": True}}
    response = await post(make_app(handle), sent)
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (400, "stream_options.include_usgae")
    assert error["message"] == "Unrecognized request argument supplied: stream_options.include_usgae"
    assert handle.calls == []
    hinted = {"model": "m", "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    assert (await post(make_app(handle), hinted)).status_code == 200  # OpenAI's padding: a hint


async def test_a_served_model_asked_at_the_wrong_endpoint_is_counted_under_its_name() -> None:
    app = make_app(FakeHandle(), kinds={"m": "classifier"})
    response = await post(app, {"model": "m", "messages": []})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_supported"
    assert [labels[1:4] for labels in app.state.metrics.snapshot()["llm_gateway_requests_total"]] == [("m", "", "404")]
