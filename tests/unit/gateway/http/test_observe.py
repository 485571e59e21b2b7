"""gateway/http/observe.py: ids, route labels, statuses, overhead and the access log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from httpx import ASGITransport, AsyncClient

from gateway.config import FrontDoorConfig
from gateway.http.access_log import AccessLog
from gateway.http.api import build_api
from gateway.http.body import read_body
from gateway.http.handlers import install_handlers
from gateway.http.observe import ObservabilityMiddleware, route_matcher
from gateway.http.state import GatewayState
from gateway.metrics.recorder import GatewayMetrics

GENERATED = re.compile(r"^[0-9a-f]{32}$")
MESSAGE = b'{"model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}'


def make_app(tmp_path: Path, echoed: bool = False) -> tuple[FastAPI, GatewayMetrics, Path]:
    app = FastAPI()
    metrics = GatewayMetrics()
    log = tmp_path / "access.log"
    access_log = AccessLog(str(log), replica="r1")

    @app.post("/v1/models/{model:path}:predict")
    async def predict(model: str, request: Request) -> JSONResponse:
        record = request.state.record
        record.model = record.variant = model
        record.model_wait_s = 0.05
        await asyncio.sleep(0.06)  # "waiting on the model"
        return JSONResponse({"request_id": request.state.request_id, "secret": "hunter2"})

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            await asyncio.sleep(float(request.query_params.get("pause", 0)))
            yield b"data: 2\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/held")
    async def held(request: Request) -> JSONResponse:
        request.app.state.holding.set()
        await asyncio.Event().wait()  # never answered: its caller gives up on it
        raise AssertionError("unreachable")

    @app.post("/upload")
    async def upload(request: Request) -> JSONResponse:
        return JSONResponse({"read": len(await read_body(request, 1 << 20, 5.0))})

    @app.get("/metrics")
    async def scrape() -> JSONResponse:
        return JSONResponse({})

    install_handlers(app)
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=metrics,
        access_log=access_log,
        route_of=route_matcher(app.router.routes, frozenset({"/metrics"})),
        server_echoes_id=echoed,
    )
    app.state.flush = access_log.flush
    app.state.holding = asyncio.Event()
    return app, metrics, log


def client(app: FastAPI) -> AsyncClient:
    return AsyncClient(transport=ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


@pytest.mark.parametrize(
    ("sent", "kept"), [("abc-123.x:y", True), ("has space", False), ("x" * 129, False), (None, False)]
)
async def test_a_sane_client_id_is_kept_and_anything_else_replaced(tmp_path: Path, sent: str | None, kept: bool) -> None:
    app, _, _ = make_app(tmp_path)
    headers = {"x-request-id": sent} if sent is not None else {}
    async with client(app) as c:
        response = await c.post("/v1/models/iris:predict", headers=headers)
    used = response.json()["request_id"]
    assert response.headers.get_list("x-request-id") == [used]
    assert used == sent if kept else GENERATED.match(used)


async def test_under_serve_a_sane_id_is_left_for_serve_to_echo(tmp_path: Path) -> None:
    app, _, _ = make_app(tmp_path, echoed=True)
    async with client(app) as c:
        sane = await c.post("/v1/models/iris:predict", headers={"x-request-id": "abc"})
        insane = await c.post("/v1/models/iris:predict", headers={"x-request-id": "a b"})
    assert "x-request-id" not in sane.headers and sane.json()["request_id"] == "abc"
    assert insane.headers["x-request-id"] == insane.json()["request_id"] != "a b"


async def test_metrics_use_the_route_template_and_overhead_leaves_out_the_model(tmp_path: Path) -> None:
    app, metrics, _ = make_app(tmp_path)
    async with client(app) as c:
        response = await c.post("/v1/models/iris:predict")
        await c.get("/nowhere")
        await c.get("/metrics")
    snapshot = metrics.snapshot()
    assert snapshot["llm_gateway_requests_total"] == {
        ("/v1/models/{model}:predict", "iris", "iris", "200", ""): 1,
        ("unmatched", "", "", "404", ""): 1,
    }
    overhead_ms = float(response.headers["x-gateway-overhead-ms"])
    assert 0 < overhead_ms < 40  # the 50 ms spent on the model are not overhead
    assert all(v == 0 for v in snapshot["llm_gateway_in_flight_requests"].values())


async def test_under_a_route_prefix_routes_are_labelled_by_the_path_below_it(tmp_path: Path) -> None:
    # Serve's proxy puts an application's route prefix in ``root_path``, and leaves it in ``path``.
    app, metrics, _ = make_app(tmp_path)
    transport = ASGITransport(app=app, raise_app_exceptions=False, root_path="/api")
    async with AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/api/v1/models/iris:predict")).status_code == 200
        assert (await c.get("/api/stream")).status_code == 200
        await c.get("/api/metrics")
    assert set(metrics.snapshot()["llm_gateway_requests_total"]) == {
        ("/v1/models/{model}:predict", "iris", "iris", "200", ""),
        ("/stream", "", "", "200", ""),
    }


async def test_streams_carry_no_overhead_header(tmp_path: Path) -> None:
    app, metrics, _ = make_app(tmp_path)
    async with client(app) as c:
        response = await c.get("/stream")
    assert "x-gateway-overhead-ms" not in response.headers
    assert metrics.snapshot()["llm_gateway_requests_total"] == {("/stream", "", "", "200", ""): 1}


async def test_a_stream_the_client_left_is_a_499(tmp_path: Path) -> None:
    app, metrics, _ = make_app(tmp_path)
    requested = asyncio.Event()

    async def receive() -> dict[str, object]:
        if not requested.is_set():
            requested.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        return None

    scope = {"type": "http", "method": "GET", "path": "/stream", "headers": [], "query_string": b"pause=5",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "root_path": "", "app": app}
    await asyncio.wait_for(app(scope, receive, send), 2)
    snapshot = metrics.snapshot()
    assert snapshot["llm_gateway_requests_total"] == {("/stream", "", "", "499", ""): 1}
    assert snapshot["llm_gateway_in_flight_requests"] == {("/stream",): 0}


async def test_a_request_cancelled_before_it_answered_is_a_499(tmp_path: Path) -> None:
    """Serve's proxy cancels a request's task when its client leaves: that is
    the client's doing, not a server error."""
    app, metrics, log = make_app(tmp_path)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: object) -> None:
        raise AssertionError(f"nothing is sent for a request its caller gave up on: {message}")

    scope = {"type": "http", "method": "GET", "path": "/held", "headers": [(b"x-request-id", b"left-1")],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "root_path": "",
             "app": app}
    task = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.wait_for(app.state.holding.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snapshot = metrics.snapshot()
    assert snapshot["llm_gateway_requests_total"] == {("/held", "", "", "499", ""): 1}
    assert snapshot["llm_gateway_in_flight_requests"] == {("/held",): 0}
    app.state.flush()
    (line,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (line["request_id"], line["status"], line["overhead_ms"]) == ("left-1", 499, None)


async def test_a_client_that_hangs_up_while_its_body_is_read_is_a_499_not_a_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, metrics, log = make_app(tmp_path)
    parts = iter([{"type": "http.request", "body": b'{"a":', "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> object:
        return next(parts)

    async def send(message: object) -> None:
        raise AssertionError(f"nothing is sent to a client gone: {message}")

    scope = {"type": "http", "method": "POST", "path": "/upload", "headers": [(b"x-request-id", b"up-1")],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "root_path": "",
             "app": app}
    with caplog.at_level("WARNING"):
        await asyncio.wait_for(app(scope, receive, send), 2)
    assert not caplog.records
    assert metrics.snapshot()["llm_gateway_requests_total"] == {("/upload", "", "", "499", ""): 1}
    app.state.flush()
    (line,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (line["request_id"], line["status"], line.get("error")) == ("up-1", 499, None)


async def test_the_access_log_has_one_json_line_per_request_and_no_content(tmp_path: Path) -> None:
    app, _, log = make_app(tmp_path)
    async with client(app) as c:
        response = await c.post("/v1/models/iris:predict?key=sk-123", json={"instances": [[1, 2]]})
    app.state.flush()
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["request_id"] == response.json()["request_id"]
    assert (line["log"], line["replica"], line["method"], line["route"], line["status"]) == (
        "access", "r1", "POST", "/v1/models/{model}:predict", 200
    )
    assert line["duration_ms"] >= line["overhead_ms"] > 0
    text = log.read_text()
    assert "hunter2" not in text and "sk-123" not in text and "[1, 2]" not in text


def whole_gateway() -> FastAPI:
    """The ingress's own app, serving no models: every model request is the gateway's own error."""
    state = GatewayState(FrontDoorConfig.model_validate({}), lambda model: None, lambda model: "")
    return build_api(state)


@pytest.mark.parametrize(
    ("method", "path", "label"),
    [
        # A fixed path whose route takes another method: the templated route that takes this one serves it.
        ("GET", "/v1/responses/input_tokens", "/v1/responses/{response_id}"),
        ("POST", "/v1/responses/input_tokens", "/v1/responses/input_tokens"),
        # A template that takes the path but not the method (predict): the models route serves it.
        ("GET", "/v1/models/iris:predict", "/v1/models/{model_id}"),
        ("POST", "/v1/models/iris:predict", "/v1/models/{model}:predict"),
        ("PUT", "/v1/responses/input_tokens", "/v1/responses/input_tokens"),  # none takes it: the first, a 405
    ],
)
async def test_a_request_is_labelled_with_the_route_that_serves_it(method: str, path: str, label: str) -> None:
    state = GatewayState(FrontDoorConfig.model_validate({}), lambda model: None, lambda model: "")
    async with client(build_api(state)) as c:
        for _ in range(2):  # (the second from what the first looked up)
            await c.request(method, path, json={})
    assert {key[0] for key in state.metrics.snapshot()["llm_gateway_requests_total"]} == {label}


@pytest.mark.parametrize(
    ("method", "path", "content", "headers", "status"),
    [
        pytest.param("POST", "/v1/messages", MESSAGE, {}, 404, id="unknown-model"),
        pytest.param("POST", "/v1/messages/count_tokens", MESSAGE, {}, 404, id="count-unknown-model"),
        pytest.param("GET", "/v1/messages", b"", {}, 405, id="method"),
        pytest.param("POST", "/v1/messages", b"{not json", {}, 400, id="not-json"),
        pytest.param("POST", "/v1/messages", b"\x1f\x8bnot gzip", {"content-encoding": "gzip"}, 400, id="bad-gzip"),
        pytest.param("POST", "/v1/messages", MESSAGE, {"content-encoding": "br"}, 415, id="brotli"),
    ],
)
async def test_the_gateways_own_errors_on_anthropics_routes_carry_its_request_id(
    method: str, path: str, content: bytes, headers: dict[str, str], status: int
) -> None:
    async with client(whole_gateway()) as c:
        sent = await c.request(method, path, content=content, headers={"content-type": "application/json", **headers})
        named = await c.request(method, path, content=content, headers={"x-request-id": "mine-1", **headers})
    assert (sent.status_code, sent.json()["type"]) == (status, "error")
    assert sent.headers.get_list("request-id") == sent.headers.get_list("x-request-id")
    assert len(sent.headers.get_list("request-id")) == 1
    assert named.headers.get_list("request-id") == ["mine-1"]


async def test_request_id_is_only_on_anthropics_routes_and_also_where_serve_echoes_the_id(tmp_path: Path) -> None:
    app, _, _ = make_app(tmp_path, echoed=True)
    async with client(app) as c:
        openai = await c.post("/v1/models/iris:predict", headers={"x-request-id": "abc"})
        anthropic = await c.post("/v1/messages", headers={"x-request-id": "abc"})
    assert "request-id" not in openai.headers
    assert anthropic.status_code == 404 and anthropic.headers.get_list("request-id") == ["abc"]


async def test_a_guards_refusal_names_its_error_in_the_access_log(tmp_path: Path) -> None:
    from gateway.auth.keys import KeyTable, hash_secret, new_secret
    from gateway.config import KeyConfig

    log = tmp_path / "access.log"
    front_door = FrontDoorConfig.model_validate({"ingress": {"access_log": str(log)}})
    keyed, local = (GatewayState(front_door, lambda model: None, lambda model: "") for _ in range(2))
    keyed.keys = KeyTable([KeyConfig.model_validate({"id": "team-a", "hash": hash_secret(new_secret())})])
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    async with client(build_api(keyed)) as c:
        assert (await c.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer nope"})).status_code == 401
    async with client(build_api(local)) as c:
        sent = await c.post("/v1/chat/completions", json=chat, headers={"origin": "https://evil.example"})
        assert sent.status_code == 403
    keyed.access_log.flush()
    local.access_log.flush()
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert [(line["status"], line.get("error")) for line in lines] == [(401, "invalid_api_key"), (403, sent.json()["error"]["code"])]


def failing_stream(app: FastAPI, path: str, error: str, status: int, ends: bool) -> None:
    """A stream at ``path`` whose failure after its first frame ``error`` and
    ``status`` stand for; it ``ends`` with an error frame, else breaks off."""

    @app.get(path)
    async def failing(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            request.state.record.error, request.state.record.late_status = error, status
            if not ends:
                raise RuntimeError("a bug in the relay")
            yield b'data: {"error": {}}\n\n'

        return StreamingResponse(body(), media_type="text/event-stream")


async def test_a_stream_cut_by_a_failure_gets_its_error_line_too(tmp_path: Path) -> None:
    app, metrics, log = make_app(tmp_path)
    failing_stream(app, "/cut", "service_unavailable", 503, ends=True)

    async with client(app) as c:
        assert (await c.get("/cut", headers={"x-request-id": "cut-1"})).status_code == 200
    app.state.flush()
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert [(line["log"], line["request_id"], line["status"], line.get("error")) for line in lines] == [
        ("error", "cut-1", 503, "service_unavailable"), ("access", "cut-1", 503, "service_unavailable")
    ]


async def test_a_client_id_ending_in_a_newline_is_replaced(tmp_path: Path) -> None:
    # (Servers in front refuse such a header today; the id names logs, chunks and headers.)
    app, _, _ = make_app(tmp_path)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/iris:predict", "query_string": b"",
             "headers": [(b"x-request-id", b"abc\n")], "http_version": "1.1", "scheme": "http",
             "server": ("t", 80), "root_path": "", "app": app}
    await asyncio.wait_for(app(scope, receive, send), 2)
    used = json.loads(b"".join(m.get("body", b"") for m in sent))["request_id"]
    assert GENERATED.match(used) and dict(sent[0]["headers"])[b"x-request-id"] == used.encode()


async def test_a_stream_that_breaks_off_on_a_failure_is_a_500_not_a_hang_up(tmp_path: Path) -> None:
    # No end reached the client, as when it leaves: but the server failed (``Answers``), and says so.
    app, metrics, log = make_app(tmp_path)
    failing_stream(app, "/broken", "internal_error", 500, ends=False)

    async with client(app) as c:
        with contextlib.suppress(Exception):
            await c.get("/broken", headers={"x-request-id": "broken-1"})
    app.state.flush()
    assert [labels[3] for labels in metrics.snapshot()["llm_gateway_requests_total"]] == ["500"]
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert [(line["log"], line["status"], line["error"]) for line in lines] == [
        ("error", 500, "internal_error"), ("access", 500, "internal_error")
    ]


async def test_a_bug_is_answered_with_the_requests_id_and_logged_under_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Answered by Starlette's last handler, outside this middleware, it had no id, and its
    # traceback was logged as "request None".
    app, metrics, log = make_app(tmp_path)

    @app.post("/v1/models/{model:path}:explain")
    async def explain(model: str) -> JSONResponse:
        raise KeyError("a bug")

    app.middleware_stack = None  # (the route above, added after the middleware was)
    async with client(app) as c:
        answer = await c.post("/v1/models/iris:explain", headers={"x-request-id": "bug-1"})
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "bug-1"
    assert answer.json()["error"]["type"] == "server_error" and "KeyError" not in answer.text
    assert "request bug-1: unexpected error while serving it" in caplog.text
    app.state.flush()
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert [(line["log"], line["request_id"], line["status"], line["error"]) for line in lines] == [
        ("access", "bug-1", 500, "internal_error")
    ]
