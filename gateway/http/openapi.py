"""The gateway's OpenAPI document: every endpoint's request and response bodies.

The handlers read their bodies themselves (parsing only what routing needs)
and relay the engines' answers unchanged, so FastAPI cannot see their
shapes. They are described here from the protocol models instead, once,
when ``/openapi.json`` is first asked for: nothing on the request path
validates twice. Errors are described as they are sent: OpenAI's envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway.http.stored import INCLUDABLE, MAX_ITEMS
from gateway.protocol.chat import ChatCompletionRequest
from gateway.protocol.completions import CompletionRequest
from gateway.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from gateway.protocol.keys import KeyInfo
from gateway.protocol.messages_api import (
    AnthropicErrorResponse,
    CountTokensRequest,
    Message,
    MessageCreateRequest,
    MessageStreamEvent,
    TokenCount,
)
from gateway.protocol.models import ModelCard, ModelList
from gateway.protocol.open_inference import ModelMetadata, ModelReady, ServerMetadata
from gateway.protocol.predict import InferErrorResponse, InferRequest, InferResponse, PredictRequest, PredictResponse
from gateway.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from gateway.protocol.responses import ChatCompletion, ChatCompletionChunk, Completion, ErrorResponse
from gateway.protocol.responses_api import (
    InputItemList,
    InputTokenCount,
    InputTokensRequest,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseObject,
    ResponseStreamEvent,
)

SSE = "text/event-stream"
JSON = "application/json"
_REF = "#/components/schemas/{model}"

# (path, method): the request body's model (None: no body), and the 200
# answer's model per media type, and the error statuses the endpoint answers.
ENDPOINTS: dict[tuple[str, str], tuple[type[BaseModel] | None, dict[str, type[BaseModel]], tuple[int, ...]]] = {
    ("/v1/chat/completions", "post"): (
        ChatCompletionRequest, {JSON: ChatCompletion, SSE: ChatCompletionChunk},
        (400, 401, 404, 408, 413, 415, 429, 503, 504),
    ),
    ("/v1/completions", "post"): (
        CompletionRequest, {JSON: Completion, SSE: Completion}, (400, 401, 404, 408, 413, 415, 429, 503, 504),
    ),
    ("/v1/responses", "post"): (
        ResponseCreateRequest, {JSON: ResponseObject, SSE: ResponseStreamEvent},
        (400, 401, 404, 408, 413, 415, 429, 503, 504),
    ),
    ("/v1/responses/input_tokens", "post"): (
        InputTokensRequest, {JSON: InputTokenCount}, (400, 401, 404, 408, 413, 415, 429, 503),
    ),
    ("/v1/responses/{response_id}", "get"): (
        None, {JSON: ResponseObject, SSE: ResponseStreamEvent}, (400, 401, 404, 429, 503),
    ),
    ("/v1/responses/{response_id}/cancel", "post"): (None, {JSON: ResponseObject}, (400, 401, 404, 429, 503)),
    ("/v1/responses/{response_id}", "delete"): (None, {JSON: ResponseDeleted}, (401, 404, 429, 503)),
    ("/v1/responses/{response_id}/input_items", "get"): (None, {JSON: InputItemList}, (400, 401, 404, 429, 503)),
    ("/v1/messages", "post"): (
        MessageCreateRequest, {JSON: Message, SSE: MessageStreamEvent}, (400, 401, 404, 408, 413, 415, 429, 504, 529),
    ),
    ("/v1/messages/count_tokens", "post"): (
        CountTokensRequest, {JSON: TokenCount}, (400, 401, 404, 408, 413, 415, 429, 529),
    ),
    ("/tokenize", "post"): (TokenizeRequest, {JSON: TokenizeResponse}, (400, 401, 404, 408, 413, 415, 429, 503)),
    ("/detokenize", "post"): (DetokenizeRequest, {JSON: DetokenizeResponse}, (400, 401, 404, 408, 413, 415, 429, 503)),
    ("/v1/embeddings", "post"): (EmbeddingRequest, {JSON: EmbeddingResponse}, (400, 401, 404, 408, 413, 415, 429, 503)),
    ("/v1/models/{model}:predict", "post"): (
        PredictRequest, {JSON: PredictResponse}, (400, 401, 404, 408, 413, 415, 429, 503),
    ),
    ("/v2/models/{model}/infer", "post"): (
        InferRequest, {JSON: InferResponse}, (400, 401, 404, 408, 413, 415, 429, 503),
    ),
    ("/v2", "get"): (None, {JSON: ServerMetadata}, (401,)),
    ("/v2/models/{model}", "get"): (None, {JSON: ModelMetadata}, (401, 404)),
    ("/v2/models/{model}/ready", "get"): (None, {JSON: ModelReady}, (401, 404)),
    ("/v1/models", "get"): (None, {JSON: ModelList}, (401,)),
    ("/v1/models/{model_id}", "get"): (None, {JSON: ModelCard}, (401, 404)),
    ("/v1/key", "get"): (None, {JSON: KeyInfo}, (401, 404, 503)),
}
_ERRORS = {
    400: "Invalid request: not JSON, a field that is wrong (named in `param`), over the context window",
    401: "Missing or unknown API key (when keys are configured)",
    404: "Unknown model or alias, or one the key may not use, or one that does not serve this endpoint "
    "(`/v1/key`: the gateway has no API keys; stored responses: unknown, made with another key, "
    "or no longer kept)",
    408: "The body did not arrive within `ingress.read_timeout_s`",
    413: "The body is over `ingress.max_body_bytes`",
    415: "The body is labelled as something other than JSON, or is in a `Content-Encoding` the gateway "
    "does not decode (it decodes `gzip` and `deflate`)",
    429: "The API key is over a limit, or the model's queue is full where it answers 429",
    503: "The model is overloaded, starting or restarting, or the key ledger cannot be reached; see `Retry-After`",
    504: "The model took longer than its `request_timeout_s`",
    529: "Anthropic's `overloaded_error`: the model is overloaded, starting or restarting, the key ledger "
    "cannot be reached, or the replica is stopping; see `Retry-After`",
}
# Routes whose errors take another envelope than OpenAI's.
_ERROR_MODELS: dict[str, type[BaseModel]] = {
    "/v1/messages": AnthropicErrorResponse,
    "/v1/messages/count_tokens": AnthropicErrorResponse,
    "/v2": InferErrorResponse,
    "/v2/models/{model}/infer": InferErrorResponse,
    "/v2/models/{model}": InferErrorResponse,
    "/v2/models/{model}/ready": InferErrorResponse,
}
_ANSWER = {
    JSON: "The answer",
    SSE: "With `stream: true`: server-sent events, one `data:` line per chunk (this schema), "
    "then `data: [DONE]`; an error after the first event arrives as `data: {\"error\": ...}`",
}
_EVENTS = (
    "With `stream: true`: server-sent events, each an `event:` line naming its type and a `data:` line "
    "(this schema), from `response.created` to `response.completed`, no `[DONE]`; an error after the "
    "first event arrives as an `error` event"
)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_INCLUDE = _query(
    "include", {"type": "array", "items": {"type": "string", "enum": sorted(INCLUDABLE)}},
    "OpenAI's values; stored items come as they were sent, so none changes the answer",
)
# The query parameters the stored-response routes read (gateway/http/stored.py); any other is a 400.
QUERY: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/v1/responses/{response_id}", "get"): [
        _query("stream", {"type": "boolean"}, "Replay the response's events as server-sent events"),
        _query("starting_after", {"type": "integer", "minimum": 0}, "With `stream`: replay after this sequence number"),
        _query("include_obfuscation", {"type": "boolean"}, "Accepted; events carry no obfuscation padding"),
        _INCLUDE,
    ],
    ("/v1/responses/{response_id}/input_items", "get"): [
        _query("after", {"type": "string"}, "List the items after this item id"),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_ITEMS, "default": 20}, "How many items"),
        _query("order", {"type": "string", "enum": ["asc", "desc"], "default": "desc"}, "Oldest or newest first"),
        _INCLUDE,
    ],
}

# API keys (README "API keys and rate limits"): OpenAI's bearer token, or
# Anthropic's `x-api-key`; none where the gateway has no keys configured.
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key, `sk-gw-...`"},
    "apiKey": {
        "type": "apiKey", "in": "header", "name": "x-api-key",
        "description": "An API key, as Anthropic's clients send it",
    },
}
_KEYED = ("/v1", "/v2", "/tokenize", "/detokenize")
_KEY_OR_NONE: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}, {}]


def describe(app: FastAPI) -> None:
    """Makes ``app.openapi()`` (``/openapi.json``, ``/docs``) describe the bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` with the gateway's bodies filled in."""
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    requests: list[type[BaseModel]] = [model for model, _, _ in ENDPOINTS.values() if model is not None]
    answers: list[type[BaseModel]] = [m for _, media, _ in ENDPOINTS.values() for m in media.values()]
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in requests]
    answers += [ErrorResponse, AnthropicErrorResponse, InferErrorResponse]
    modes += [(m, "serialization") for m in answers]
    _, defs = models_json_schema(modes, ref_template=_REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)  # FastAPI's 422: the gateway answers 400 instead
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    for (path, method), (request, media, errors) in ENDPOINTS.items():
        operation = schema["paths"][path][method]
        if path.startswith(_KEYED):
            operation["security"] = _KEY_OR_NONE
        if (path, method) in QUERY:
            operation["parameters"] = [*operation.get("parameters", []), *QUERY[path, method]]
        if request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {JSON: {"schema": _ref(request)}},
            }
        operation["responses"] = {
            "200": {
                "description": "; ".join(_describe_answer(m, model) for m, model in media.items()),
                "content": {m: {"schema": _ref(model)} for m, model in media.items()},
            },
            **{
                str(status): {
                    "description": _ERRORS[status],
                    "content": {JSON: {"schema": _ref(_ERROR_MODELS.get(path, ErrorResponse))}},
                }
                for status in errors
            },
        }
    return schema


def _describe_answer(media: str, model: type[BaseModel]) -> str:
    if model is ResponseStreamEvent:
        return _EVENTS
    if model is MessageStreamEvent:
        return _EVENTS.replace("`response.created` to `response.completed`", "`message_start` to `message_stop`")
    return _ANSWER[media]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}
