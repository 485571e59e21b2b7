"""gateway/http/answers.py: a stream's error frame is logged with the status its API gives that error."""

from __future__ import annotations

import pytest

from gateway.http.answers import _late_status


@pytest.mark.parametrize(
    ("endpoint", "status", "code", "logged"),
    [
        ("messages", 503, "service_unavailable", 529),  # Anthropic's overloaded_error
        ("messages", 429, "overloaded", 529),
        ("messages", 504, "request_timeout", 504),
        ("chat", 503, "service_unavailable", 503),
        ("responses", 503, "shutting_down", 503),
        ("messages", None, None, None),
    ],
)
def test_a_streams_error_is_logged_with_the_status_its_api_answers_it_with(
    endpoint: str, status: int | None, code: str | None, logged: int | None
) -> None:
    assert _late_status(endpoint, status, code) == logged  # type: ignore[arg-type]
