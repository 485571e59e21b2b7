"""gateway/status.py: looking at a cluster changes nothing on it."""

from __future__ import annotations

import pytest

from gateway import status


def test_a_cluster_without_serve_is_shown_as_such_and_serve_is_not_started(monkeypatch: pytest.MonkeyPatch) -> None:
    # Started here, Serve would take its defaults (loopback proxies), and a later
    # `llm-gateway serve --host 0.0.0.0` on that cluster would be ignored.
    def started() -> None:
        raise AssertionError("Serve was started by looking")

    monkeypatch.setattr("ray.serve._private.api.serve_start", started)
    monkeypatch.setattr("ray.serve.context._get_global_client", lambda raise_if_no_controller_running: None)
    assert status.collect("llm-gateway") == {"applications": {}}
