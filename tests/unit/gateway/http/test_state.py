"""gateway/http/state.py: routing swaps in place; model cards list aliases."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.config import RoutingConfig, parse_config
from gateway.http.state import GatewayState

CONFIG = parse_config(
    {
        "models": [{"name": "a", "engine": "echo"}, {"name": "b", "engine": "echo"}],
        "routing": {"routes": [{"name": "chat", "variants": {"a": 1, "b": 0}}]},
    }
)


class NoHandle:
    def options(self, **_: Any) -> NoHandle:
        return self


def make_state() -> GatewayState:
    return GatewayState(CONFIG, {"a": NoHandle(), "b": NoHandle()})


def test_apply_routing_changes_where_new_requests_go() -> None:
    state = make_state()
    assert {state.routes.resolve("chat", f"k{i}").target for i in range(50)} == {"a"}  # type: ignore[union-attr]
    state.apply_routing(RoutingConfig.model_validate({"routes": [{"name": "chat", "variants": {"a": 0, "b": 1}}]}))
    assert {state.routes.resolve("chat", f"k{i}").target for i in range(50)} == {"b"}  # type: ignore[union-attr]
    card = next(c for c in state.model_cards() if c.id == "chat")
    assert [(v.id, v.weight) for v in card.variants or []] == [("a", 0.0), ("b", 1.0)]


def test_apply_routing_refuses_unknown_variants_and_keeps_the_old_table() -> None:
    state = make_state()
    before = state.routes
    with pytest.raises(ValidationError, match="unknown variant"):
        state.apply_routing(RoutingConfig.model_validate({"routes": [{"name": "chat", "variants": {"zz": 1}}]}))
    assert state.routes is before


def test_model_cards_list_models_then_aliases() -> None:
    assert [card.id for card in make_state().model_cards()] == ["a", "b", "chat"]
