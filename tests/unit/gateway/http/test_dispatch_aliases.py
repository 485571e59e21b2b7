"""gateway/http/dispatch.py: aliases (fallback, shadow, counting under alias and variant) and live tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from gateway import sse
from gateway.errors import InternalServerError, InvalidRequestError, OverloadedError
from gateway.http.dispatch import ModelDispatcher
from gateway.http.serving import LLMClient, ServedModel, ServingTable
from gateway.metrics.families import ITL_BUCKETS
from gateway.protocol.engine import Outcome, Reply
from gateway.routing.table import Alias
from gateway.routing.weighted import Variant
from tests.unit.gateway.http.test_dispatch import FakeHandle, make_app, post
from tests.unit.gateway.http.test_relay_connection import until


def make_routed_app(handles: dict[str, FakeHandle], alias: Any) -> FastAPI:
    return make_app(handles=handles, alias=alias)


def make_routed_app_of_kind(handles: dict[str, FakeHandle], alias: Any, kind: str) -> FastAPI:
    return make_app(handles=handles, alias=alias, kinds=dict.fromkeys(handles, kind))


@pytest.mark.parametrize("stream", [False, True])
async def test_fallback_serves_from_the_next_variant_when_the_first_is_down(stream: bool) -> None:
    down = OverloadedError("full")
    first = FakeHandle(unary=down, stream=[down])
    second = FakeHandle(unary=b'{"served":"b"}', stream=[sse.frame({"served": "b"}) + sse.DONE])
    alias = Alias([Variant("a", 100), Variant("b", 1)], fallback=True)
    app = make_routed_app({"a": first, "b": second}, alias)
    response = await post(app, {"model": "r", "stream": stream})
    assert response.status_code == 200
    assert response.headers["x-gateway-variant"] == "b"
    assert second.calls[0].body["model"] == "b"


async def test_fallback_ends_once_the_first_byte_is_out() -> None:
    # The client already has the first variant's text: a second answer would be spliced onto it.
    first = FakeHandle(stream=[sse.frame({"served": "a"}), InternalServerError("engine died")])
    second = FakeHandle(stream=[sse.frame({"served": "b"}) + sse.DONE])
    app = make_routed_app({"a": first, "b": second}, Alias([Variant("a", 100), Variant("b", 1)], fallback=True))
    response = await post(app, {"model": "r", "stream": True})
    assert response.status_code == 200 and response.headers["x-gateway-variant"] == "a"
    payloads = sse.parse(response.content)
    assert payloads[0] == {"served": "a"} and payloads[1]["error"]["code"] == "internal_error" and payloads[2] is None
    assert second.calls == []


async def test_fallback_never_retries_a_client_mistake() -> None:
    first = FakeHandle(unary=InvalidRequestError("bad field", param="x"))
    second = FakeHandle()
    app = make_routed_app({"a": first, "b": second}, Alias([Variant("a", 100), Variant("b", 1)], fallback=True))
    response = await post(app, {"model": "r"})
    assert response.status_code == 400
    assert response.headers["x-gateway-variant"] == "a"
    assert second.calls == []


async def test_without_fallback_the_failure_reaches_the_client() -> None:
    first = FakeHandle(unary=OverloadedError("full"))
    second = FakeHandle()
    app = make_routed_app({"a": first, "b": second}, Alias([Variant("a", 100), Variant("b", 1)]))
    response = await post(app, {"model": "r"})
    assert response.status_code == 503
    assert second.calls == []


async def test_shadow_gets_a_copy_and_the_client_gets_the_primary_answer() -> None:
    primary = FakeHandle(unary=b'{"from":"primary"}')
    shadow = FakeHandle(unary=b'{"from":"shadow"}', delay=2.0)
    alias = Alias([Variant("a", 1)], shadow="s", shadow_percent=100)
    app = make_routed_app({"a": primary, "s": shadow}, alias)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await post(app, {"model": "r", "messages": []})
    # Not held up by the shadow: answered well before the shadow's 2 s are over.
    assert loop.time() - started < 1.0
    assert response.json() == {"from": "primary"}
    assert shadow.calls[0].body == {"model": "s", "messages": []}
    assert shadow.calls[0].request_id.endswith("-shadow")
    await asyncio.sleep(max(0.0, started + 2.2 - loop.time()))  # the shadow call ends within the test


async def test_a_responses_shadow_copy_is_neither_stored_nor_in_the_background() -> None:
    # Its answer is dropped: stored, it took a place from the shadow model's own users'
    # responses; in the background, it outlived its request_timeout_s.
    primary, shadow = FakeHandle(unary=b'{"id":"resp_1"}'), FakeHandle(unary=b"{}")
    app = make_routed_app({"a": primary, "s": shadow}, Alias([Variant("a", 1)], shadow="s", shadow_percent=100))
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/responses", json={"model": "r", "input": "Hi", "background": True})
    assert response.status_code == 200
    await until(lambda: bool(shadow.calls))
    assert (shadow.calls[0].body["store"], shadow.calls[0].body["background"]) == (False, False)
    assert primary.calls[0].body["background"] is True  # the client's own request as sent


async def test_a_tokenizer_request_through_an_alias_is_no_assignment_of_its_experiment() -> None:
    # Counted, a client tokenizing before each request doubled its variant's share of the split.
    handle = FakeHandle(unary=Reply(b'{"tokens": [1], "count": 1, "max_model_len": 8}', Outcome()))
    app = make_app(handles={"a": handle}, alias=Alias([Variant("a", 1)]))
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/tokenize", json={"model": "r", "prompt": "hi"})
    assert response.status_code == 200 and handle.calls
    assert app.state.metrics.snapshot()["llm_gateway_ab_assignments_total"] == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_alias_assignment_and_outcome_are_counted_under_alias_and_variant(stream: bool) -> None:
    # Three gaps between four tokens, bucketed by the replica: two in the third bucket, one past the last.
    gaps = (0, 0, 2) + (0,) * (len(ITL_BUCKETS) - 3) + (1,)
    outcome = Outcome(prompt_tokens=3, completion_tokens=4, first_token_s=0.01, cached_tokens=2,
                      inter_token_counts=gaps, inter_token_sum_s=90.08)  # 2 x 40 ms + 90 s
    handle = FakeHandle(unary=Reply(b"{}", outcome), stream=[b"data: {}\n\n", sse.DONE, outcome])
    app = make_app(handles={"a": handle}, alias=Alias([Variant("a", 1)]))
    response = await post(app, {"model": "r", "messages": [], "stream": stream})
    assert response.status_code == 200
    if stream:
        assert response.content == b"data: {}\n\n" + sse.DONE
    snapshot = app.state.metrics.snapshot()
    assert snapshot["llm_gateway_ab_assignments_total"] == {("r", "a"): 1}
    assert snapshot["llm_gateway_tokens_total"] == {
        ("r", "a", "prompt", ""): 3, ("r", "a", "completion", ""): 4, ("r", "a", "cached", ""): 2,
    }
    assert snapshot["llm_gateway_time_to_first_token_seconds"][("r", "a")][1] == pytest.approx(0.01)
    assert snapshot["llm_gateway_inter_token_latency_seconds"][("r", "a")] == (list(gaps), pytest.approx(90.08))
    assert snapshot["llm_gateway_requests_total"] == {("/chat", "r", "a", "200", ""): 1}


async def test_a_request_is_served_by_the_table_it_arrived_under() -> None:
    old, new = FakeHandle(unary=b'{"from": "old"}', delay=0.2), FakeHandle(unary=b'{"from": "new"}')
    app = make_app(old)
    dispatcher: ModelDispatcher = app.state.dispatcher
    swapped = ServingTable(dispatcher.routes, "x-session-id", {"m": ServedModel("m", "llm", LLMClient(new))})
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        first = asyncio.create_task(client.post("/chat", json={"model": "m"}))
        while not old.calls:
            await asyncio.sleep(0.01)
        dispatcher.serve(swapped)  # a reconfiguration while the first is in flight
        second = await client.post("/chat", json={"model": "m"})
        assert (await first).json() == {"from": "old"}
    assert second.json() == {"from": "new"} and dispatcher.table is swapped


async def test_a_request_still_uploading_its_body_is_served_by_the_table_in_place_once_it_is_in() -> None:
    # Routed by the table of its first byte, a slow upload reached a model a
    # live change had since removed (stopping by then).
    old, new = FakeHandle(unary=b'{"from": "old"}'), FakeHandle(unary=b'{"from": "new"}')
    app = make_app(old)
    dispatcher: ModelDispatcher = app.state.dispatcher
    swapped = ServingTable(dispatcher.routes, "x-session-id", {"m": ServedModel("m", "llm", LLMClient(new))})
    arrived = asyncio.Event()
    parts = [b'{"model": ', b'"m"}']

    async def body() -> AsyncIterator[bytes]:
        yield parts[0]
        arrived.set()
        await asyncio.sleep(0.1)  # (the rest of the body is on its way)
        yield parts[1]

    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        sending = asyncio.create_task(client.post("/chat", content=body(), headers={"content-type": "application/json"}))
        await arrived.wait()
        dispatcher.serve(swapped)
        assert (await sending).json() == {"from": "new"}
    assert old.calls == []


class FailedToDeploy(FakeHandle):
    """A classical model's handle whose deployment failed: Serve's router says so when asked for a replica."""

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        raise DeploymentUnavailableError(DeploymentID(name="a", app_name="llm-gateway"))
        yield  # (a generator, as Serve's)


async def test_fallback_serves_a_classical_route_whose_first_variant_failed_to_deploy() -> None:
    second = FakeHandle(unary=b'{"predictions": [2]}')
    alias = Alias([Variant("a", 100), Variant("b", 1)], fallback=True)
    app = make_routed_app_of_kind({"a": FailedToDeploy(), "b": second}, alias, "classifier")
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/predict/r", json={"instances": [[1]]})
    assert response.status_code == 200 and response.headers["x-gateway-variant"] == "b"
    assert response.json() == {"predictions": [2]}


async def test_a_tokenizer_request_through_an_alias_is_not_copied_to_its_shadow() -> None:
    # A count mirrors no request the shadow model would serve (a detokenize's ids are the primary's vocabulary).
    handle = FakeHandle(unary=Reply(b'{"tokens": [1], "count": 1, "max_model_len": 8}', Outcome()))
    alias = Alias([Variant("a", 1)], shadow="s", shadow_percent=100)
    app = make_app(handles={"a": handle, "s": FakeHandle()}, alias=alias)
    copies: list[Any] = []
    app.state.dispatcher._shadows.send = lambda model, call: copies.append(call)
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/tokenize", json={"model": "r", "prompt": "hi"})).status_code == 200
        assert (await client.post("/chat", json={"model": "r", "messages": []})).status_code == 200
    assert [call.endpoint for call in copies] == ["chat"]
