"""gateway/routing/table.py: request model names to served models."""

from __future__ import annotations

from gateway.routing.table import Route, RouteTable


def test_resolve_known_name() -> None:
    table = RouteTable(["tiny-chat-v1", "echo"])

    assert table.resolve("echo") == Route(name="echo", target="echo")
    assert table.resolve("tiny-chat-v1") == Route(name="tiny-chat-v1", target="tiny-chat-v1")


def test_resolve_unknown_name_is_none() -> None:
    table = RouteTable(["echo"])

    assert table.resolve("gpt-4") is None
    assert table.resolve("ECHO") is None
    assert table.resolve("") is None


def test_names_keep_config_order() -> None:
    assert RouteTable(["b", "a", "c"]).names() == ["b", "a", "c"]
