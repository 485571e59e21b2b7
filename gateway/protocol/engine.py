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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a model replica reports about one answer, besides its bytes.

    Token counts equal the usage the answer carries (or would carry: a
    stream reports them whether or not the client asked for usage).
    ``inter_token_s`` holds runs of ``(seconds, tokens)``: each of those
    tokens came that long after the one before it. ``batch_size`` is set on
    exactly one request of each batch, so that each batch is counted once.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    inter_token_s: tuple[tuple[float, int], ...] = ()
    batch_size: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A replica's answer: a whole JSON body, or a stream's last bytes, with its outcome."""

    body: bytes
    outcome: Outcome
