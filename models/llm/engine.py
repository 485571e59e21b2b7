"""The seam between an LLM replica and the engine that answers it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.config import LLMModelConfig
    from gateway.protocol.engine import EngineRequest
    from models.llm.tally import GenerationTally


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

    ``complete`` returns the JSON body (bytes) of a request answered whole;
    ``stream`` the SSE frames (bytes; chat and completions end with
    ``data: [DONE]``) of a streaming one, which of the two being the
    request's own ``stream``. Errors known before the first frame are raised
    as ``gateway.errors.GatewayError``; later ones arrive as an error frame.
    Cancelling the iterator (or the awaiting task) aborts the engine request.
    The engine counts the request's tokens and times them in ``tally`` as it
    answers: complete once the body is returned or the stream has ended.
    """

    async def start(self) -> None: ...

    async def complete(self, request: EngineRequest, tally: GenerationTally) -> bytes: ...

    async def stream(self, request: EngineRequest, tally: GenerationTally) -> AsyncIterator[bytes]: ...

    async def most_tokens(self, request: EngineRequest) -> int:
        """The prompt's tokens plus the most the request may generate (every
        choice of every prompt), counted as ``complete`` would count them;
        raises GatewayError as ``complete`` does for a request it refuses."""
        ...

    async def set_adapters(self, adapters: Mapping[str, str]) -> dict[str, str]:
        """Serves exactly the LoRA adapters ``adapters`` (name: source) from now
        on, as far as it can; returns, by name, why one could not be loaded."""
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


def make_engine(config: LLMModelConfig) -> LLMEngine:
    """The engine ``config.engine`` names (vLLM is imported only when used)."""
    from gateway.config import EchoModelConfig, VLLMModelConfig

    if isinstance(config, EchoModelConfig):
        from models.llm.echo import EchoEngine

        return EchoEngine(config)
    if isinstance(config, VLLMModelConfig):
        from models.llm.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    raise ValueError(f"{config.engine!r} is not an LLM engine")


def body_of(answer: bytes | AsyncIterator[bytes]) -> bytes:
    """``answer`` as a whole body; a stream here is the engine's bug, not the client's."""
    if not isinstance(answer, bytes):
        raise TypeError("the engine made a stream for a request to be answered whole")
    return answer


def frames_of(answer: bytes | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``answer`` as a stream's frames; a whole body here is the engine's bug."""
    if isinstance(answer, bytes):
        raise TypeError("the engine made a whole body for a request to be streamed")
    return answer


def input_tokens_body(count: int) -> bytes:
    """What ``POST /v1/responses/input_tokens`` answers, as OpenAI does."""
    return b'{"object":"response.input_tokens","input_tokens":%d}' % count
