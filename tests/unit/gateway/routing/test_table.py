"""gateway/routing/table.py: concrete names, aliases, unknown names."""

from __future__ import annotations

import random
from collections import Counter

from gateway.routing.table import Alias, Route, RouteTable
from gateway.routing.weighted import Variant

TABLE = RouteTable(
    ["v1", "v2", "other"],
    {
        "chat": Alias([Variant("v1", 80), Variant("v2", 20)]),
        "off": Alias([Variant("v1", 0), Variant("v2", 1)]),
    },
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


def test_fallback_order_follows_weight_and_skips_zero() -> None:
    table = RouteTable(
        ["a", "b", "c", "d"],
        {"r": Alias([Variant("a", 1), Variant("b", 5), Variant("c", 3), Variant("d", 0)], fallback=True)},
        random.Random(0),
    )
    for i in range(50):
        route = table.resolve("r", f"k{i}")
        assert route is not None
        assert route.target not in route.fallbacks and "d" not in route.fallbacks
        weights = {"a": 1, "b": 5, "c": 3}
        assert list(route.fallbacks) == sorted(route.fallbacks, key=lambda n: -weights[n])
        assert len(route.fallbacks) == 2


def test_without_fallback_there_is_nothing_to_try_next() -> None:
    route = TABLE.resolve("chat", "k")
    assert route is not None and route.fallbacks == ()


def test_shadow_copies_the_configured_share() -> None:
    table = RouteTable(
        ["a", "s"], {"r": Alias([Variant("a", 1)], shadow="s", shadow_percent=25)}, random.Random(5)
    )
    copies = sum(table.resolve("r").shadow == "s" for _ in range(4000))  # type: ignore[union-attr]
    assert 0.22 < copies / 4000 < 0.28
