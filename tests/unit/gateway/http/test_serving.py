"""gateway/http/serving.py and the routing plan: one immutable table per config."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.auth.keys import ApiKey
from gateway.config import KeyConfig, parse_config
from gateway.errors import InvalidRequestError, ModelNotFoundError, ModelNotSupportedError
from gateway.http.auth import PROTECTED
from gateway.http.plan import plan
from gateway.http.endpoints import ENDPOINTS
from gateway.http.serving import ClassicalClient, LLMClient, ServingTable, build_table
from gateway.routing.table import Alias, RouteTable
from gateway.routing.weighted import Variant

MODELS = [
    {"name": "a", "engine": "echo", "max_queued_requests": 8, "max_ongoing_requests": 4, "request_timeout_s": 3},
    {"name": "b", "engine": "echo"},
    {"name": "iris", "engine": "sklearn", "model": "models:/iris/1", "max_batch_size": 16, "batch_wait_timeout_s": 0},
]


class Handle:
    def __init__(self, name: str) -> None:
        self.name = name

    def options(self, **_: Any) -> Handle:
        return self


def table_for(models: list[dict[str, Any]], previous: ServingTable | None = None, **handles: Handle) -> ServingTable:
    config = parse_config({"models": models, "routing": {"routes": [{"name": "chat", "variants": {"a": 1, "b": 1}}]}})
    known = {name: handles.get(name, Handle(name)) for name in (m["name"] for m in models)}
    routes = RouteTable([m.name for m in config.models], {"chat": Alias([Variant("a", 1), Variant("b", 1)])})
    return build_table(config, routes, known, previous, replica_wait_s=1.0)


def test_a_table_holds_each_models_client_kind_and_limits() -> None:
    table = table_for(MODELS)
    a, iris = table.model("a"), table.model("iris")
    assert isinstance(a.client, LLMClient) and a.kind == "llm" and a.timeout_s == 3
    assert a.client.relay.capacity == 4 + 8  # running and queued, refused at the ingress beyond
    assert a.client.relay.places == 4  # (a shadow copy's bound where the queue has none)
    assert table.model("b").client.relay.capacity is None  # unbounded queue  # type: ignore[union-attr]
    assert isinstance(iris.client, ClassicalClient) and iris.kind == "classifier"
    assert iris.client.gather is not None and iris.client.gather.max_group == 16
    with pytest.raises(TypeError):
        table.models["c"] = a  # type: ignore[index]  # never changed in place: replaced whole


def test_a_new_table_keeps_the_clients_of_unchanged_deployments() -> None:
    a, b = Handle("a"), Handle("b")
    first = table_for(MODELS, a=a, b=b)
    changed = [{**MODELS[0], "max_queued_requests": 2}, MODELS[1], {**MODELS[2], "max_batch_size": 1}]
    second = table_for(changed, first, a=a, b=b, iris=first.model("iris").client.source)
    assert second.model("a").client is first.model("a").client  # connections and counts kept
    assert second.model("a").client.relay.capacity == 4 + 2  # type: ignore[union-attr]
    assert second.model("iris").client.gather is None  # type: ignore[union-attr]  # batching turned off
    assert first.model("a").timeout_s == 3 and first.model("b") is not second.model("b")
    # A new handle (the deployment was replaced) gets a new client.
    third = table_for(MODELS, second, a=Handle("a"), b=b)
    assert third.model("a").client is not second.model("a").client


def test_the_plan_routes_from_body_and_headers_alone() -> None:
    table = table_for(MODELS)
    chat = ENDPOINTS["chat"]
    body = {"model": "chat", "messages": [], "stream": True, "user": "u1"}
    first = plan(table, chat, body, {}, None)
    assert first.name == "chat" and first.route.alias and first.stream
    assert {plan(table, chat, body, {}, None).route.target for _ in range(20)} == {first.route.target}  # sticky
    by_header = {plan(table, chat, {"model": "chat"}, {"x-session-id": "s1"}, None).route.target for _ in range(20)}
    assert len(by_header) == 1
    # An empty header is no cohort (a template's unset variable): not one that all such requests share.
    unset = {plan(table, chat, {"model": "chat"}, {"x-session-id": ""}, None).route.target for _ in range(40)}
    assert unset == {"a", "b"}
    # Only endpoints that stream do; a predict's model is in its path.
    assert plan(table, ENDPOINTS["messages_count"], {"model": "a", "stream": True}, {}, None).stream is False
    predict = plan(table, ENDPOINTS["predict"], {"instances": [[1]]}, {}, None, path_model="iris")
    assert (predict.name, predict.route.target, predict.envelope) == ("iris", "iris", None)


def test_the_plan_refuses_what_cannot_be_served() -> None:
    table = table_for(MODELS)
    with pytest.raises(ModelNotFoundError):
        plan(table, ENDPOINTS["chat"], {"model": "nope"}, {}, None)
    with pytest.raises(ModelNotSupportedError, match=r"The model `iris` \(classifier\) does not serve /v1/chat/completions"):
        plan(table, ENDPOINTS["chat"], {"model": "iris"}, {}, None)
    with pytest.raises(ModelNotSupportedError, match=r"does not serve /v1/models/a:predict"):
        plan(table, ENDPOINTS["predict"], {}, {}, None, path_model="a")
    with pytest.raises(InvalidRequestError, match="stream"):
        plan(table, ENDPOINTS["chat"], {"model": "a", "stream": "yes"}, {}, None)
    # A model the key may not use is one that does not exist.
    key = ApiKey.of(KeyConfig(id="k", hash="sha256:" + "0" * 64, models=["b"]))
    assert plan(table, ENDPOINTS["chat"], {"model": "b"}, {}, key).route.target == "b"
    with pytest.raises(ModelNotFoundError):
        plan(table, ENDPOINTS["chat"], {"model": "a"}, {}, key)


def test_every_endpoint_names_its_path_and_kinds() -> None:
    assert {spec.name for spec in ENDPOINTS.values()} == set(ENDPOINTS)
    assert {name for name, spec in ENDPOINTS.items() if spec.streams} == {"chat", "completion", "responses", "messages"}
    # Every model endpoint is behind the key check.
    assert all(spec.path.startswith(PROTECTED) and spec.kinds for spec in ENDPOINTS.values())


def test_an_adapter_is_reached_through_its_models_client() -> None:
    base = {"name": "base", "engine": "vllm", "model": "org/m", "request_timeout_s": 9, "lora_adapters": {"ada": "org/a"}}
    config = parse_config({"models": [base]})
    table = build_table(config, RouteTable(config.served()), {"base": Handle("base")}, None, replica_wait_s=1.0)
    base, ada = table.model("base"), table.model("ada")
    assert ada.client is base.client and (ada.name, ada.kind, ada.timeout_s) == ("ada", "llm", 9)
    route = table.routes.resolve("ada")
    assert route is not None and (route.target, route.alias) == ("ada", False)


class WakingHandle:
    """A deployment at zero replicas until it is sent a call (Serve queues and counts it; a
    look-up for a replica it does not count)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.cancelled = 0
        self.up = asyncio.Event()

    def options(self, method_name: str = "", **_: Any) -> Any:
        handle = self

        class Method:
            def remote(self, *args: Any) -> Any:
                handle.sent.append(method_name)
                handle.up.set()
                return SimpleNamespace(cancel=lambda: setattr(handle, "cancelled", handle.cancelled + 1))

        return Method()

    @contextlib.asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        await self.up.wait()
        yield None


async def test_a_classical_model_at_zero_replicas_is_woken_by_its_look_up() -> None:
    at_zero = {**MODELS[2], "autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    handle = WakingHandle()
    client = table_for([MODELS[0], MODELS[1], at_zero], iris=handle).model("iris").client  # type: ignore[arg-type]
    assert isinstance(client, ClassicalClient)
    await asyncio.wait_for(client.ready(), 1)  # it was a 503 for ever: nothing asked Serve for a replica
    assert handle.sent == ["info"] and handle.cancelled == 0  # (it runs to its end on the replica woken)
    # A model that keeps a replica is only looked for.
    kept = WakingHandle()
    kept.up.set()
    client = table_for(MODELS, iris=kept).model("iris").client  # type: ignore[arg-type]
    await client.ready()
    assert kept.sent == []


async def test_a_failed_look_up_gives_up_its_wake_call_and_says_its_own_failure() -> None:
    from gateway.http.replica_lookup import RunningReplica

    cancelled: list[bool] = []

    def refused_cancel() -> None:  # Serve's cancel raises what the call failed with (a full queue, say)
        cancelled.append(True)
        raise RuntimeError("the wake call was refused")

    class Failing:
        @contextlib.asynccontextmanager
        async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
            raise ConnectionError("the router failed")
            yield None

    running = RunningReplica(Failing())
    running.wake = lambda: SimpleNamespace(cancel=refused_cancel)
    with pytest.raises(ConnectionError, match="the router failed"):
        await running._look()
    assert cancelled == [True] and not running.fresh()
