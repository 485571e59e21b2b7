"""The seam between an LLM replica and the engine that answers it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.config import ModelConfig
    from gateway.protocol.engine import EngineRequest
    from models.llm.tally import GenerationTally

# What a replica whose engine died answers (503) until it is replaced.
ENGINE_DEAD = "The model's engine stopped; a new replica is starting. Please retry shortly."


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the gateway reports about a served model."""

    root: str | None
    max_model_len: int | None
    # How the ingress may count prompt tokens as this engine does
    # (``gateway.auth.prompt_count``); None: only the engine can.
    tokenizer: dict[str, Any] | None = None


class LLMEngine(Protocol):
    """An OpenAI-speaking engine inside one replica.

    ``generate`` returns the JSON body (bytes) of a non-streaming response, or
    an async iterator of SSE frames (bytes, ``data: [DONE]`` last) for a
    streaming one. Errors known before the first frame are raised as
    ``gateway.errors.GatewayError``; later ones arrive as an error frame.
    Cancelling the iterator (or the awaiting task) aborts the engine request.
    The engine counts the request's tokens and times them in ``tally`` as it
    answers: complete once the body is returned or the stream has ended.
    """

    async def start(self) -> None: ...

    async def generate(
        self, request: EngineRequest, tally: GenerationTally
    ) -> bytes | AsyncIterator[bytes]: ...

    async def most_tokens(self, request: EngineRequest) -> int:
        """The prompt's tokens plus the most the request may generate (every
        choice of every prompt), counted as ``generate`` would count them;
        raises GatewayError as ``generate`` does for a request it refuses."""
        ...

    def info(self) -> EngineInfo: ...

    def forget_response(self, response_id: str) -> None:
        """Drops a stored response (Responses API), if kept; its id then is unknown."""
        ...

    def num_unfinished_requests(self) -> int: ...

    def metrics_text(self) -> str | None:
        """The engine's own metrics in Prometheus text format; None if it keeps none."""
        ...

    async def check_health(self) -> None: ...

    def dead(self) -> bool:
        """True once the engine can serve nothing more (its process is gone)."""
        ...

    async def shutdown(self) -> None: ...


def make_engine(config: ModelConfig) -> LLMEngine:
    """The engine ``config.engine`` names (vLLM is imported only when used)."""
    if config.engine == "echo":
        from models.llm.echo import EchoEngine

        return EchoEngine(config)
    from models.llm.vllm_engine import VLLMEngine

    return VLLMEngine(config)
