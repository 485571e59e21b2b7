"""The few request fields the ingress reads to route a request.

Everything else in the body travels to the model replica untouched and is
validated there by the engine's own schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class RequestEnvelope(BaseModel):
    """Routing fields of a chat or completions request."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="Model or alias that should serve the request.")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> RequestEnvelope:
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` can only be set when `stream` is true")
        return self

    @classmethod
    def of(cls, body: dict[str, Any]) -> RequestEnvelope:
        """Validates the routing fields of ``body``; raises pydantic.ValidationError."""
        return cls.model_validate(body)
