"""gateway/http/state.py: models and routes swap in place; model cards list aliases."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.auth.limiter import LimiterClient
from gateway.auth.local import LocalLimiter
from gateway.config import ConfigError, FrontDoorConfig, ModelConfig
from gateway.http import state as state_module
from gateway.http.state import GatewayState
from gateway.metrics import engine_pages
from gateway.metrics.engine_pages import answer_scrapes
from gateway.metrics.hub import MetricsHub
from gateway.protocol.relay import RelayAddress

MODELS = [
    {"name": "a", "engine": "echo"},
    {"name": "b", "engine": "echo"},
    {"name": "iris", "engine": "sklearn", "model": "/m/iris"},
]
ROUTING = {"routes": [{"name": "chat", "variants": {"a": 1, "b": 0}}]}


class NoHandle:
    def __init__(self, name: str) -> None:
        self.name = name

    def options(self, **_: Any) -> NoHandle:
        return self


def make_state() -> tuple[GatewayState, list[str]]:
    looked_up: list[str] = []

    def handle_for(model: ModelConfig) -> NoHandle:
        looked_up.append(model.name)
        return NoHandle(model.name)

    state = GatewayState(FrontDoorConfig(), handle_for, lambda m: f"app:{m.name}")
    state.apply(MODELS, ROUTING)
    return state, looked_up


def targets(state: GatewayState, name: str) -> set[str]:
    return {state.routes.resolve(name, f"k{i}").target for i in range(50)}  # type: ignore[union-attr]


def test_apply_changes_where_new_requests_go() -> None:
    state, _ = make_state()
    assert targets(state, "chat") == {"a"}
    state.apply(MODELS, {"routes": [{"name": "chat", "variants": {"a": 0, "b": 1}}]})
    assert targets(state, "chat") == {"b"}
    card = next(c for c in state.model_cards() if c.id == "chat")
    assert [(v.id, v.weight) for v in card.variants or []] == [("a", 0.0), ("b", 1.0)]


def test_apply_adds_and_removes_models_and_keeps_handles_of_the_others() -> None:
    state, looked_up = make_state()
    assert looked_up == ["a", "b", "iris"]
    models = [MODELS[0], MODELS[2], {"name": "c", "engine": "echo"}]
    state.apply(models, {"routes": [{"name": "chat", "variants": {"a": 1, "c": 1}}]})
    assert looked_up == ["a", "b", "iris", "c"]  # only the new model is looked up
    assert targets(state, "chat") == {"a", "c"}
    assert state.routes.resolve("b") is None


def test_apply_refuses_an_invalid_table_and_keeps_the_old_one() -> None:
    state, _ = make_state()
    before = state.routes
    with pytest.raises(ConfigError, match="unknown variant"):
        state.apply(MODELS, {"routes": [{"name": "chat", "variants": {"zz": 1}}]})
    with pytest.raises(ConfigError, match="mix model kinds"):
        state.apply(MODELS, {"routes": [{"name": "chat", "variants": {"a": 1, "iris": 1}}]})
    assert state.routes is before


def test_model_cards_list_models_then_aliases_with_their_kind() -> None:
    state, _ = make_state()
    cards = state.model_cards()
    assert [(card.id, card.kind) for card in cards] == [
        ("a", "llm"),
        ("b", "llm"),
        ("iris", "classifier"),
        ("chat", "llm"),
    ]


def test_before_the_first_apply_no_model_is_served() -> None:
    state = GatewayState(FrontDoorConfig(), NoHandle, lambda m: "x")
    assert state.model_cards() == []
    assert state.routes.resolve("a") is None


def test_a_seeded_routing_repeats_its_choices_after_each_deploy() -> None:
    state, _ = make_state()
    seeded = {"seed": 7, "routes": [{"name": "chat", "variants": {"a": 1, "b": 1}}]}

    def picks() -> list[str]:
        return [state.routes.resolve("chat").target for _ in range(40)]  # type: ignore[union-attr]

    state.apply(MODELS, seeded)
    first = picks()
    state.apply(MODELS, seeded)
    assert picks() == first and set(first) == {"a", "b"}
    state.apply(MODELS, {**seeded, "seed": None})
    assert picks() != first  # unseeded: fresh randomness (equal by chance with odds 2**-40)


async def test_learning_context_windows_makes_one_info_handle_per_model() -> None:
    """``options`` builds a new handle each call: /v1/models must not pay it per request."""
    made: list[str] = []

    class Replica:
        def __init__(self, window: int | None) -> None:
            self.window = window

        async def info(self) -> Any:
            from models.llm.engine import EngineInfo

            return EngineInfo(root=None, max_model_len=self.window)

    class Handle:
        def __init__(self, name: str) -> None:
            self.name = name
            self.replica = Replica(None)  # not known yet: asked again on the next refresh

        def options(self, method_name: str) -> Any:
            made.append(f"{self.name}.{method_name}")
            replica = self.replica

            class Call:
                def remote(self) -> Any:
                    return replica.info()

            return Call()

    handles: dict[str, Handle] = {}
    state = GatewayState(
        FrontDoorConfig(), lambda m: handles.setdefault(m.name, Handle(m.name)), lambda m: m.name
    )
    state.apply(MODELS, ROUTING)
    for _ in range(3):
        await state.refresh_model_info()
    handles["a"].replica.window = 128
    await state.refresh_model_info()
    assert sorted(m for m in made if m.endswith(".info")) == ["a.info", "b.info"]
    assert {card.id: card.max_model_len for card in state.model_cards()}["a"] == 128


async def test_a_model_that_does_not_say_its_window_in_time_is_not_asked_at_every_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While a model was down or starting, every GET /v1/models waited INFO_TIMEOUT_S for it.
    asked: list[str] = []

    class Handle:
        def __init__(self, name: str) -> None:
            self.name = name

        def options(self, method_name: str) -> Any:
            name = self.name

            class Call:
                async def remote(self) -> Any:
                    asked.append(name)
                    await asyncio.Event().wait()  # (no replica answers)

            return Call()

    monkeypatch.setattr(state_module, "INFO_TIMEOUT_S", 0.01)
    state = GatewayState(FrontDoorConfig(), lambda m: Handle(m.name), lambda m: m.name)
    state.apply(MODELS[:1], {})
    await state.refresh_model_info()
    await state.refresh_model_info()
    assert asked == ["a"]
    monkeypatch.setattr(state_module, "INFO_RETRY_S", 0.0)  # (its time has passed)
    await state.refresh_model_info()
    assert asked == ["a", "a"]


@pytest.mark.parametrize("handoff", [True, False])
def test_ingress_stream_handoff_decides_whether_local_replicas_are_offered_streams(
    handoff: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.http.handoff.reachable", lambda address: True)  # a replica on this host
    front_door = FrontDoorConfig.model_validate({"ingress": {"stream_handoff": handoff}})
    state = GatewayState(front_door, NoHandle, lambda m: "x")
    state.apply(MODELS, ROUTING)
    relay = state.dispatcher.table.models["a"].client.relay  # type: ignore[union-attr]
    local = RelayAddress("127.0.0.1", 1, "t", "r", "llmgw-handoff-x")
    assert relay._takes_sockets(local) is handoff


class _Remote:
    """A deployment handle of ``target``, its calls made in this loop."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        async def call(*args: Any) -> Any:
            result = method(*args)
            return await result if inspect.isawaitable(result) else result

        return SimpleNamespace(remote=call)


class _EngineReplica:
    """An LLM replica answering scrapes through the ingress (``answer_scrapes``)."""

    def __init__(self, ingress: GatewayState, name: str) -> None:
        self.renders = 0
        self.task = asyncio.create_task(answer_scrapes(_Remote(ingress), name, self.render))

    def render(self) -> str:
        self.renders += 1
        return f"# TYPE vllm:renders counter\nvllm:renders_total {self.renders}\n"

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_pages, "HOLD_S", 0.05)
    monkeypatch.setattr(engine_pages, "FRESH_WAIT_S", 0.3)


async def test_a_lone_ingress_replica_keeps_the_engine_pages_and_the_ledger_itself(short_waits: None) -> None:
    state = GatewayState(FrontDoorConfig(), NoHandle, lambda m: "x")
    assert isinstance(state.limiter, LocalLimiter)
    state.metrics.assigned("chat", "a")
    replica = _EngineReplica(state, "r")
    try:
        await asyncio.sleep(0.1)  # its call is held, unanswered
        page = await state.metrics_page()
        assert replica.renders == 1
        assert 'vllm:renders_total{replica="r"} 1' in page
        assert 'llm_gateway_ab_assignments_total{route="chat",variant="a"} 1' in page
    finally:
        await replica.stop()
    await state.engine_gone("r")  # as a stopping replica says
    assert "vllm:" not in await asyncio.wait_for(state.metrics_page(), 0.1)


async def test_with_a_shared_hub_the_engine_pages_reach_it_through_any_ingress_replica(short_waits: None) -> None:
    hub = MetricsHub()
    one, two = (GatewayState(FrontDoorConfig(), NoHandle, lambda m: "x", hub=_Remote(hub), source=s) for s in "ab")
    assert isinstance(one.limiter, LimiterClient)
    replica = _EngineReplica(one, "r")  # its calls land on replica a
    try:
        await asyncio.sleep(0.1)
        page = await two.metrics_page()  # a scrape lands on replica b
        assert 'vllm:renders_total{replica="r"} 1' in page
    finally:
        await replica.stop()
    await one.engine_gone("r")
    assert "vllm:" not in await asyncio.wait_for(hub.render("b", two.metrics.snapshot()), 0.1)


class Router(NoHandle):
    """Serve's router for one model: names its replica once ``up`` is set (never, for a model that is down)."""

    def __init__(self, name: str, up: bool) -> None:
        super().__init__(name)
        self.up = asyncio.Event()
        if up:
            self.up.set()

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        await self.up.wait()
        yield SimpleNamespace(replica_metadata=RelayAddress("127.0.0.1", 1, "t", replica=self.name).metadata())


async def test_warm_up_finds_each_models_replica_and_gives_up_on_a_model_that_is_down_in_time() -> None:
    routers = {"a": Router("a", up=True), "b": Router("b", up=False), "iris": Router("iris", up=True)}
    state = GatewayState(FrontDoorConfig(), lambda m: routers[m.name], lambda m: f"app:{m.name}")
    state.apply(MODELS, ROUTING)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await state.warm_up(0.3)
    assert 0.25 <= loop.time() - started < 2
    assert state.dispatcher.table.models["a"].client.relay.knows("a")  # type: ignore[union-attr]
    assert not state.dispatcher.table.models["b"].client.relay.knows("b")  # type: ignore[union-attr]
    assert state.dispatcher.table.models["iris"].client.running.fresh()  # type: ignore[union-attr]


async def test_a_model_added_live_is_looked_up_before_it_is_routed_to() -> None:
    # Its first requests waited on Serve's router learning of it: once past replica_wait_s, a 503.
    routers = {"a": Router("a", up=True), "b": Router("b", up=True), "iris": Router("iris", up=True),
               "c": Router("c", up=False)}
    state = GatewayState(FrontDoorConfig(), lambda m: routers[m.name], lambda m: f"app:{m.name}")
    state.apply(MODELS, ROUTING)
    models = [*MODELS, {"name": "c", "engine": "echo"}]
    routing = {"routes": [{"name": "chat", "variants": {"a": 1, "c": 1}}]}
    applying = asyncio.ensure_future(state.apply_warmed(models, routing, [], timeout_s=5))
    await asyncio.sleep(0.05)
    assert not applying.done() and targets(state, "chat") == {"a"}  # the old table, meanwhile
    routers["c"].up.set()
    await asyncio.wait_for(applying, 1)
    assert targets(state, "chat") == {"a", "c"}
    assert state.dispatcher.table.models["c"].client.relay.knows("c")  # type: ignore[union-attr]
    # A model that stays down is routed to after the wait, as at start.
    routers["d"] = Router("d", up=False)
    started = asyncio.get_running_loop().time()
    await state.apply_warmed([*models, {"name": "d", "engine": "echo"}], routing, [], timeout_s=0.2)
    assert asyncio.get_running_loop().time() - started < 1 and "d" in state.dispatcher.table.models


def test_an_adapter_is_listed_after_the_models_with_its_parent_and_window() -> None:
    state = GatewayState(FrontDoorConfig(), NoHandle, lambda m: f"app:{m.name}")
    base = {"name": "base", "engine": "vllm", "model": "/m/base", "max_model_len": 64}
    base["lora_adapters"] = {"ada": "org/ada"}
    state.apply([base, MODELS[0]], {"routes": [{"name": "ab", "variants": {"base": 1, "ada": 1}}]})
    cards = state.model_cards()
    assert [card.id for card in cards] == ["base", "a", "ada", "ab"]
    assert (cards[2].parent, cards[2].root, cards[2].max_model_len, cards[2].kind) == ("base", "org/ada", 64, "llm")
    assert cards[0].parent is None and cards[3].kind == "llm"
    assert targets(state, "ab") == {"base", "ada"}


def test_an_aliass_window_is_the_smallest_of_its_variants_once_all_are_known() -> None:
    # It was null: clients calling the alias read the window from its card.
    state = GatewayState(FrontDoorConfig(), NoHandle, lambda m: f"app:{m.name}")
    base = {"name": "base", "engine": "vllm", "model": "/m/base", "max_model_len": 64, "lora_adapters": {"ada": "/m/ada"}}
    wide, unknown = {"name": "wide", "engine": "echo", "max_model_len": 256}, {"name": "open", "engine": "echo"}
    routing = {"routes": [{"name": "ab", "variants": {"ada": 1, "wide": 1}},
                          {"name": "cd", "variants": {"wide": 1, "open": 1}},
                          {"name": "ef", "variants": {"iris": 1}}]}  # fmt: skip
    state.apply([base, wide, unknown, MODELS[2]], routing)
    windows = {card.id: card.max_model_len for card in state.model_cards()}
    assert (windows["ab"], windows["cd"], windows["ef"]) == (64, None, None)


def test_a_model_taking_an_adapters_name_gets_its_own_deployment() -> None:
    # Promoting an adapter to a merged model kept the base model's handle:
    # its requests went to the base replicas, and failed once they unloaded it.
    looked_up: list[str] = []

    def handle_for(model: ModelConfig) -> NoHandle:
        looked_up.append(model.name)
        return NoHandle(model.name)

    state = GatewayState(FrontDoorConfig(), handle_for, lambda m: f"app:{m.name}")
    base = {"name": "base", "engine": "vllm", "model": "/m/base", "lora_adapters": {"tuned": "org/ada"}}
    state.apply([base], {})
    merged = {"name": "tuned", "engine": "vllm", "model": "/m/merged"}
    state.apply([{**base, "lora_adapters": {}}, merged], {})
    assert looked_up == ["base", "tuned"]
    models = state.dispatcher.table.models
    assert models["tuned"].client.source.name == "tuned"  # type: ignore[union-attr]
    assert models["tuned"].client is not models["base"].client


def test_a_model_that_changes_shape_under_its_name_is_learnt_again() -> None:
    # New weights or another window under the same name: its clients kept the
    # old tokenizer and window, and /v1/models the old context, until a restart.
    state = GatewayState(FrontDoorConfig(), NoHandle, lambda m: f"app:{m.name}")
    base = {"name": "a", "engine": "echo", "max_model_len": 64}
    state.apply([base, MODELS[1]], {})
    a, b = (state.dispatcher.table.models[name].client for name in ("a", "b"))
    state.apply([{**base, "max_model_len": None}, MODELS[1]], {})
    models = state.dispatcher.table.models
    assert models["a"].client is not a and models["b"].client is b  # (b is as it was)
    assert models["a"].client.source is a.source  # the same deployment, replicas replaced in place
    assert next(card for card in state.model_cards() if card.id == "a").max_model_len is None  # not the old 64


async def test_models_without_a_running_replica_hold_a_listing_for_one_wait_not_one_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.http import state as state_module

    monkeypatch.setattr(state_module, "INFO_TIMEOUT_S", 0.3)

    class Down:
        def __init__(self, name: str) -> None:
            self.name = name

        def options(self, method_name: str) -> Any:
            return SimpleNamespace(remote=lambda: asyncio.Event().wait())  # no replica answers

    state = GatewayState(FrontDoorConfig(), lambda m: Down(m.name), lambda m: m.name)
    state.apply([{"name": n, "engine": "echo"} for n in "abcd"], {})
    started = asyncio.get_running_loop().time()
    await state.refresh_model_info()
    assert asyncio.get_running_loop().time() - started < 0.3 * 2  # (asked one after another: 1.2 s)
