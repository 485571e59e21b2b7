"""gateway/http/openapi.py: /openapi.json describes every body the gateway takes and gives."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.requests import Request

from gateway.config import FrontDoorConfig
from gateway.http.api import build_api
from gateway.errors import InvalidRequestError
from gateway.http.openapi import ENDPOINTS
from gateway.http.stored import input_items_query, retrieve_query
from gateway.http.state import GatewayState


def document() -> dict[str, Any]:
    state = GatewayState(FrontDoorConfig.model_validate({}), lambda model: None, lambda model: "")
    return build_api(state).openapi()


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]


def test_every_endpoint_names_its_request_and_response_bodies() -> None:
    doc = document()
    for (path, method), (request, media, errors) in ENDPOINTS.items():
        operation = doc["paths"][path][method]
        if request is not None:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert resolve(doc, body)["title"] == request.__name__
        answer = operation["responses"]["200"]["content"]
        assert set(answer) == set(media)
        for status in errors:
            error = resolve(doc, operation["responses"][str(status)]["content"]["application/json"]["schema"])
            assert error["required"] == ["error"]
        assert "422" not in operation["responses"]  # the gateway answers 400, in OpenAI's shape


def test_the_chat_schema_carries_openai_fields_and_their_limits() -> None:
    doc = document()
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "model"} <= set(chat["required"])
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    stream = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    chunk = resolve(doc, stream["schema"])
    assert chunk["properties"]["object"]["const"] == "chat.completion.chunk"
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_the_document_is_built_once() -> None:
    state = GatewayState(FrontDoorConfig.model_validate({}), lambda model: None, lambda model: "")
    app = build_api(state)
    assert app.openapi() is app.openapi()


def test_model_routes_say_how_a_key_is_sent_and_that_an_open_gateway_wants_none() -> None:
    # Else SDK generators make clients with no way to send a key.
    doc = document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "x-api-key")
    for (path, method) in ENDPOINTS:
        security = doc["paths"][path][method].get("security")
        if path.startswith(("/v1/", "/v2/")):
            assert security == [{"bearer": []}, {"apiKey": []}, {}], path
    assert "security" not in doc["paths"]["/health"]["get"]


def test_the_open_inference_protocols_routes_document_its_error_the_message_alone() -> None:
    doc = document()
    for path in ("/v2", "/v2/models/{model}"):
        error = doc["paths"][path]["get"]["responses"]["401"]["content"]["application/json"]["schema"]
        assert resolve(doc, error)["properties"]["error"]["type"] == "string", path


def sample(schema: dict[str, Any]) -> list[str]:
    if schema["type"] == "array":
        return [schema["items"]["enum"][0]]
    if schema["type"] == "boolean":
        return ["true"]
    if schema["type"] == "integer":
        return [str(schema.get("maximum", 3))]
    return [schema.get("enum", ["msg_1"])[0]]


def request_with(query: list[tuple[str, str]]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": urlencode(query)})


def test_stored_response_routes_document_the_query_parameters_they_take() -> None:
    # Generated SDKs send only what the document lists: each listed parameter
    # is taken as documented, and one that is not listed is refused.
    doc = document()
    readers = {
        "/v1/responses/{response_id}": retrieve_query,
        "/v1/responses/{response_id}/input_items": input_items_query,
    }
    for path, read in readers.items():
        listed = [p for p in doc["paths"][path]["get"]["parameters"] if p["in"] == "query"]
        query = [(p["name"], value) for p in listed for value in sample(p["schema"])]
        assert len(listed) >= 4
        read(request_with(query))
        with pytest.raises(InvalidRequestError):
            read(request_with([*query, ("unlisted", "1")]))
    input_items = doc["paths"]["/v1/responses/{response_id}/input_items"]["get"]["parameters"]
    limit = next(p for p in input_items if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 100, 20)
    with pytest.raises(InvalidRequestError):
        input_items_query(request_with([("limit", str(limit["maximum"] + 1))]))
