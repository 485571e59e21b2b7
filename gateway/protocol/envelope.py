"""The few request fields the ingress reads to route a request.

Everything else in the body travels to the model replica untouched and is
validated there by the engine's own schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _token_id_key(key: str) -> str:
    """A logit_bias key as OpenAI writes a token id. vLLM reads each with
    ``int()``, so "050", " 50", "+50", "5_0" and "٥٠" were all id 50, and
    two of them in one request left one bias, the other silently dropped."""
    if not _TOKEN_ID.fullmatch(key):
        raise ValueError("a token id is written as a decimal integer, without sign, spaces or leading zeros")
    return key


_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,18}", re.ASCII)

# OpenAI's logit_bias: token id to a bias from -100 to 100. vLLM clamps a
# bias outside that range (and NaN) to it, and reads true or "3" as a
# number; here each is refused, never altered.
LogitBias = dict[
    Annotated[str, AfterValidator(_token_id_key)],
    Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False, strict=True)],
]


class StreamOptions(BaseModel):
    """A stream's options: vLLM's, and OpenAI's ``include_obfuscation`` (random
    padding of each event against length side channels), taken as a hint.
    Any other is refused: vLLM drops what it does not know, so a misspelt
    ``include_usgae`` would leave the usage out unsaid."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


def _only_with_stream(value: BaseModel | None, info: ValidationInfo) -> BaseModel | None:
    """A ``stream_options`` validator: set only with ``stream: true``."""
    if value is not None and not info.data.get("stream"):
        raise ValueError("`stream_options` can only be set when `stream` is true")
    return value


class ModelEnvelope(BaseModel):
    """Routing fields every OpenAI request has (embeddings have no more)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="Model or alias that should serve the request.")
    user: str | None = None
    # The end user's id OpenAI's API now asks for in place of ``user`` (chat, Responses).
    safety_identifier: StrictStr | None = None

    @property
    def cohort(self) -> str | None:
        """The A/B cohort key the body gives: ``user``, else ``safety_identifier``
        (an empty one is none: a template's unset variable)."""
        return self.user or self.safety_identifier or None

    @classmethod
    def of(cls, body: dict[str, Any]) -> Self:
        """Validates the routing fields of ``body``; raises pydantic.ValidationError."""
        return cls.model_validate(body)


class IdentifiedEnvelope(ModelEnvelope):
    """A request vLLM lets name its own id in the body (``request_id``). The
    gateway keeps one id per request (``x-request-id``: response ids, logs,
    metrics), so a body's id must be that one."""

    request_id: StrictStr | None = None


class RequestEnvelope(IdentifiedEnvelope):
    """Routing fields of a chat or completions request."""

    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128, description="Choices to generate.")

    _stream_options_need_stream = field_validator("stream_options")(_only_with_stream)


class ResponsesStreamOptions(BaseModel):
    """A Responses stream's options: OpenAI's ``include_obfuscation`` alone,
    taken as a hint (chat's ``include_usage`` has no place here: every
    Responses stream ends with its usage)."""

    model_config = ConfigDict(extra="forbid")

    include_obfuscation: StrictBool | None = None


class ResponsesEnvelope(IdentifiedEnvelope):
    """Routing fields of a Responses API request: a follow-up goes to the
    replica that stores the response it continues. ``background`` and
    ``store`` decide how the gateway answers and keeps it, so they are true
    or false: vLLM would read ``1`` or ``"yes"`` as true where the gateway
    did not."""

    stream: StrictBool | None = False
    stream_options: ResponsesStreamOptions | None = None
    previous_response_id: StrictStr | None = None
    background: StrictBool | None = None
    store: StrictBool | None = None

    _stream_options_need_stream = field_validator("stream_options")(_only_with_stream)


class MessagesMetadata(BaseModel):
    """Anthropic's ``metadata`` holds ``user_id`` alone: a misspelt one
    (``userId``) would leave the request without its cohort, unsaid."""

    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr | None = None


class MessagesEnvelope(ModelEnvelope):
    """Routing fields of an Anthropic Messages API request: its cohort key
    (``user``, for sticky A/B routing) is ``metadata.user_id``."""

    stream: StrictBool | None = False
    metadata: MessagesMetadata | None = None

    @model_validator(mode="after")
    def _user_from_metadata(self) -> Self:
        if self.metadata is not None and self.metadata.user_id:
            self.user = self.metadata.user_id
        return self
