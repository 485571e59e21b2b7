"""What crosses a Ray handle from the ingress to a model replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A validated-for-routing OpenAI request, addressed to one concrete model.

    ``body`` is the client's JSON object as sent, except ``model`` which names
    the concrete model that serves it.
    """

    endpoint: Endpoint
    body: dict[str, Any]
    request_id: str

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))
