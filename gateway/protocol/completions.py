"""`POST /v1/completions` request schema (OpenAI's fields, in its order).

The vLLM engine validates with vLLM's own schema; this one serves the echo
engine and documents the surface. Unknown fields are kept (vLLM extras).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.protocol.envelope import LogitBias, StreamOptions


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: StrictBool | None = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)
    n: int | None = Field(1, ge=1, le=128)  # (null: not set, one choice)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None

    def prompts(self) -> list[str]:
        """The prompts as text (token-id prompts are rendered as their numbers)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [""]
        if isinstance(p[0], int):
            return [" ".join(str(t) for t in p)]
        if isinstance(p[0], list):
            return [" ".join(str(t) for t in ids) for ids in p]  # type: ignore[union-attr]
        return list(p)  # type: ignore[arg-type]
