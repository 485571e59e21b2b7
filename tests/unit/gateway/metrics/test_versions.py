"""The metrics path while the gateway rolls from one version to the next:
replicas and the hub of the version before meet those of the new one."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from gateway.config import FrontDoorConfig
from gateway.http.state import GatewayState
from gateway.metrics.recorder import GatewayMetrics
from gateway.protocol.engine import Outcome


def older_outcome(**values: Any) -> Outcome:
    """An Outcome as one pickled by a replica of the version before
    ``cached_tokens`` unpickles here: that slot is left unset."""
    outcome = object.__new__(Outcome)
    for field in dataclasses.fields(Outcome):
        if field.name != "cached_tokens":
            object.__setattr__(outcome, field.name, values.get(field.name, field.default))
    return outcome


def test_an_answer_from_a_replica_of_the_version_before_is_counted() -> None:
    metrics = GatewayMetrics()
    metrics.answered("m", "m", older_outcome(prompt_tokens=3, completion_tokens=4))
    assert metrics.snapshot()["llm_gateway_tokens_total"] == {("m", "m", "prompt", ""): 3, ("m", "m", "completion", ""): 4}


async def test_a_hub_of_the_version_before_still_renders_the_page() -> None:
    class OlderHub:
        """Its ``render`` takes a source and a snapshot, no version."""

        def __init__(self) -> None:
            self.render = SimpleNamespace(remote=self._render)

        async def _render(self, source: str, snapshot: Any) -> str:
            return f"page of {source}"

    state = GatewayState(FrontDoorConfig(), lambda model: None, lambda model: "", hub=OlderHub(), source="s")
    assert await state.metrics_page() == "page of s"
