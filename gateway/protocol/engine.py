"""What crosses a Ray handle from the ingress to a model replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["chat", "completion", "embedding", "predict", "infer"]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A validated-for-routing request, addressed to one concrete model.

    ``body`` is the client's JSON object as sent, except that an OpenAI body's
    ``model`` names the concrete model that serves it; ``model`` names it for
    every endpoint (predict bodies carry no model field).
    """

    endpoint: Endpoint
    body: dict[str, Any]
    request_id: str
    model: str = ""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))
