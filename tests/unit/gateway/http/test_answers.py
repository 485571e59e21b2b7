"""gateway/http/answers.py: a stream's error frame is logged with the status its API gives that error."""

from __future__ import annotations

import pytest

from gateway.http.answers import Answers, _late_status
from gateway.metrics.recorder import GatewayMetrics, RequestRecord


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


async def test_a_stream_whose_delivery_breaks_is_the_servers_failure_not_a_hang_up() -> None:
    # Without its end the stream looked like one its client left: a 499, which dashboards leave out.
    class Breaking:
        handed_off = False

        async def pipe(self, sink: object) -> bool:
            raise RuntimeError("a bug in the relay")

        def close(self) -> None:
            return None

    record = RequestRecord(request_id="r", route="/v1/chat/completions", started=0.0)
    deliver = Answers(GatewayMetrics())._deliver
    with pytest.raises(RuntimeError):
        await deliver(Breaking(), object(), "chat", record)  # type: ignore[arg-type]
    assert (record.late_status, record.error) == (500, "internal_error")
