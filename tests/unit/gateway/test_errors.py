"""gateway/errors.py: each error knows its status and OpenAI shape, and survives Ray."""

from __future__ import annotations

import pickle

import pytest
from pydantic import BaseModel, Field, ValidationError

from gateway.errors import (
    ContextLengthExceededError,
    GatewayError,
    InternalServerError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    NotImplementedFeatureError,
    OverloadedError,
    ResponseNotFoundError,
    ServiceUnavailableError,
)

ALL_ERRORS: list[tuple[type[GatewayError], int, str, str | None]] = [
    (GatewayError, 500, "server_error", None),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (ContextLengthExceededError, 400, "invalid_request_error", "context_length_exceeded"),
    (NotFoundError, 404, "invalid_request_error", "not_found"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (MethodNotAllowedError, 405, "invalid_request_error", "method_not_allowed"),
    (NotImplementedFeatureError, 400, "invalid_request_error", "not_implemented"),
    (ServiceUnavailableError, 503, "service_unavailable", "service_unavailable"),
    (OverloadedError, 503, "service_unavailable", "overloaded"),
    (InternalServerError, 500, "server_error", "internal_error"),
]


@pytest.mark.parametrize(("cls", "status", "type_", "code"), ALL_ERRORS)
def test_status_type_and_code(cls: type[GatewayError], status: int, type_: str, code: str | None) -> None:
    error = cls("boom")

    assert error.status_code == status
    assert error.type == type_
    assert error.code == code
    assert error.message == "boom"
    assert str(error) == "boom"


@pytest.mark.parametrize(("cls", "status", "type_", "code"), ALL_ERRORS)
def test_to_dict_is_the_openai_envelope(
    cls: type[GatewayError], status: int, type_: str, code: str | None
) -> None:
    envelope = cls("boom", param="messages").to_dict()

    assert envelope == {"error": {"message": "boom", "type": type_, "param": "messages", "code": code}}
    assert envelope["error"]["code"] is None or isinstance(envelope["error"]["code"], str)


def test_explicit_code_and_status_override_the_class_defaults() -> None:
    error = OverloadedError("slow down", code="rate_limited", status=429)

    assert error.status_code == 429
    assert error.to_dict()["error"]["code"] == "rate_limited"


def test_model_not_found_names_the_model() -> None:
    error = ModelNotFoundError.for_model("gpt-9")

    assert error.to_dict() == {
        "error": {
            "message": "The model `gpt-9` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_a_missing_response_is_404_by_its_path_and_400_as_a_follow_ups_previous_response() -> None:
    gone = ResponseNotFoundError.for_id("resp_x", "response_id")
    assert (gone.status_code, gone.code, gone.param) == (404, "response_not_found", "response_id")
    # As OpenAI answers it: clients that then resend the whole conversation look for this code.
    previous = ResponseNotFoundError.for_id("resp_x", "previous_response_id")
    assert previous.to_dict()["error"]["type"] == "invalid_request_error"
    assert (previous.status_code, previous.code, previous.param) == (400, "previous_response_not_found", "previous_response_id")
    assert previous.message.startswith("Previous response with id 'resp_x' not found.")
    rebuilt = GatewayError.from_wire(previous.to_wire())  # (as a replica's error reaches the ingress)
    assert isinstance(rebuilt, ResponseNotFoundError) and rebuilt.to_dict() == previous.to_dict()
    assert rebuilt.status_code == 400


@pytest.mark.parametrize("cls", [ServiceUnavailableError, OverloadedError])
def test_unavailable_errors_send_retry_after(cls: type[ServiceUnavailableError]) -> None:
    assert cls("busy").headers() == {"retry-after": "1"}
    assert cls("busy", retry_after_s=7).headers() == {"retry-after": "7"}


@pytest.mark.parametrize("cls", [InvalidRequestError, NotFoundError, InternalServerError])
def test_other_errors_send_no_extra_headers(cls: type[GatewayError]) -> None:
    assert cls("nope").headers() == {}


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("bad n", param="n"),
        ContextLengthExceededError("too long", param="messages"),
        ModelNotFoundError.for_model("gpt-9"),
        OverloadedError("busy", status=429, retry_after_s=4),
        ServiceUnavailableError("down", retry_after_s=None),
        InternalServerError("oops", code="engine_dead"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_pickle_round_trip_keeps_everything(error: GatewayError) -> None:
    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is type(error)
    assert copy.message == error.message
    assert copy.param == error.param
    assert copy.code == error.code
    assert copy.status_code == error.status_code
    assert copy.retry_after_s == error.retry_after_s
    assert copy.to_dict() == error.to_dict()
    assert copy.headers() == error.headers()


class _Body(BaseModel):
    model: str
    n: int = Field(1, ge=1)


def _validation_error(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Body.model_validate(data)
    return info.value


def test_from_validation_missing_field() -> None:
    error = InvalidRequestError.from_validation(_validation_error({}))

    assert error.param == "model"
    assert error.message == "Missing required parameter: 'model'."
    assert error.status_code == 400


def test_from_validation_bad_value_names_field_and_reason() -> None:
    error = InvalidRequestError.from_validation(_validation_error({"model": "m", "n": 0}))

    assert error.param == "n"
    assert error.message == "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."


def test_from_validation_top_level_error_has_no_param() -> None:
    error = InvalidRequestError.from_validation(_validation_error([1, 2]))

    assert error.param is None
    assert "valid dictionary" in error.message
