"""The gateway's model endpoints, one small object each: its path, the model
kinds that can answer it, and the routing fields read from its body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from gateway.config import ModelKind
from gateway.errors import InvalidRequestError, ModelNotSupportedError
from gateway.protocol.engine import Endpoint
from gateway.protocol.envelope import MessagesEnvelope, ModelEnvelope, RequestEnvelope, ResponsesEnvelope
from gateway.validation import check_scalars

LLM: frozenset[ModelKind] = frozenset({"llm"})
CLASSICAL: frozenset[ModelKind] = frozenset({"classifier", "embedding"})


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint. ``envelope`` reads the routing fields of its body (None:
    the model is named in the path, the body is the model's alone);
    ``streams`` whether its requests may ask for a stream."""

    name: Endpoint
    path: str
    kinds: frozenset[ModelKind]
    envelope: type[ModelEnvelope] | None = ModelEnvelope
    streams: bool = False

    def routing_fields(self, body: dict[str, Any]) -> ModelEnvelope | None:
        """The body's routing fields (None when the path names the model);
        raises InvalidRequestError naming a bad one."""
        if self.envelope is None:
            return None
        if (wrong := check_scalars(self.envelope, body)) is not None:  # before pydantic's lax reading
            raise InvalidRequestError(wrong.message, param=wrong.param, code=wrong.code)
        try:
            return self.envelope.of(body)
        except ValidationError as exc:
            raise InvalidRequestError.from_validation(exc) from None

    def check_kind(self, name: str, kind: ModelKind) -> None:
        """Refuses (404 ``model_not_supported``) a model that cannot answer here."""
        if kind not in self.kinds:
            raise ModelNotSupportedError(
                f"The model `{name}` ({kind}) does not serve {self.path.format(model=name)}.",
                param="model",
            )


def _specs(*specs: EndpointSpec) -> Mapping[Endpoint, EndpointSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


ENDPOINTS: Mapping[Endpoint, EndpointSpec] = _specs(
    EndpointSpec("chat", "/v1/chat/completions", LLM, RequestEnvelope, streams=True),
    EndpointSpec("completion", "/v1/completions", LLM, RequestEnvelope, streams=True),
    EndpointSpec("responses", "/v1/responses", LLM, ResponsesEnvelope, streams=True),
    EndpointSpec("responses_input_tokens", "/v1/responses/input_tokens", LLM, ResponsesEnvelope),
    EndpointSpec("responses_retrieve", "/v1/responses/{response_id}", LLM, None),
    EndpointSpec("responses_cancel", "/v1/responses/{response_id}/cancel", LLM, None),
    EndpointSpec("responses_delete", "/v1/responses/{response_id}", LLM, None),
    EndpointSpec("responses_input_items", "/v1/responses/{response_id}/input_items", LLM, None),
    EndpointSpec("messages", "/v1/messages", LLM, MessagesEnvelope, streams=True),
    EndpointSpec("messages_count", "/v1/messages/count_tokens", LLM),
    EndpointSpec("tokenize", "/tokenize", LLM),
    EndpointSpec("detokenize", "/detokenize", LLM),
    EndpointSpec("embedding", "/v1/embeddings", frozenset({"embedding"})),
    EndpointSpec("predict", "/v1/models/{model}:predict", CLASSICAL, None),
    EndpointSpec("infer", "/v2/models/{model}/infer", CLASSICAL, None),
)
