"""models/llm/vllm_engine.py: vLLM's error envelopes as the gateway's errors."""

from __future__ import annotations

import pytest

from gateway import errors
from models.llm.vllm_engine import translate_error


@pytest.mark.parametrize(
    ("error", "cls", "status"),
    [
        ({"code": 400, "message": "bad top_p", "param": "top_p"}, errors.InvalidRequestError, 400),
        (
            {"code": 400, "message": "This model's maximum context length is 512"},
            errors.ContextLengthExceededError,
            400,
        ),
        ({"code": 404, "message": "The model `x` does not exist."}, errors.ModelNotFoundError, 404),
        (
            {"code": 404, "message": "Response with id 'resp_1' not found.", "param": "response_id"},
            errors.ResponseNotFoundError,
            404,
        ),
        # A feature the model lacks is the client's to change: 400, never retried or fallen back from.
        ({"code": 501, "message": "not supported"}, errors.NotImplementedFeatureError, 400),
        ({"code": 503, "message": "busy"}, errors.ServiceUnavailableError, 503),
        ({"code": 500, "message": "Traceback ..."}, errors.InternalServerError, 500),
    ],
)
def test_vllm_errors_map_by_status(error: dict[str, object], cls: type[errors.GatewayError], status: int) -> None:
    translated = translate_error({"error": error}, "messages")
    assert type(translated) is cls and translated.status_code == status
    assert "Traceback" not in translated.message
