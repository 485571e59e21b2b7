"""gateway/routing/table.py: concrete names, aliases, unknown names."""

from __future__ import annotations

import random
from collections import Counter

from gateway.routing.table import Route, RouteTable
from gateway.routing.weighted import Variant

TABLE = RouteTable(
    ["v1", "v2", "other"],
    {"chat": [Variant("v1", 80), Variant("v2", 20)], "off": [Variant("v1", 0), Variant("v2", 1)]},
    random.Random(3),
)


def test_concrete_name_serves_itself() -> None:
    assert TABLE.resolve("other") == Route(name="other", target="other", alias=False)


def test_unknown_name_resolves_to_none() -> None:
    assert TABLE.resolve("gpt-17") is None
    assert TABLE.resolve("Chat") is None  # names are exact


def test_alias_resolves_to_a_variant_and_says_so() -> None:
    route = TABLE.resolve("chat", "user-1")
    assert route is not None and route.alias and route.name == "chat"
    assert route.target in {"v1", "v2"}


def test_alias_with_a_key_is_sticky_and_without_one_is_split() -> None:
    assert len({TABLE.resolve("chat", "user-42").target for _ in range(50)}) == 1  # type: ignore[union-attr]
    counts = Counter(TABLE.resolve("chat").target for _ in range(4000))  # type: ignore[union-attr]
    assert 0.75 < counts["v1"] / 4000 < 0.85


def test_zero_weight_variant_gets_nothing() -> None:
    assert {TABLE.resolve("off", f"k{i}").target for i in range(500)} == {"v2"}  # type: ignore[union-attr]
