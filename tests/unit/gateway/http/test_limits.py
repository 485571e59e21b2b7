"""gateway/http/limits.py: OpenAI's words, headers and durations for limited keys."""

from __future__ import annotations

import pytest

from gateway.auth.keys import ApiKey
from gateway.auth.ledger import Refusal, Usage
from gateway.http.limits import duration, embedding_tokens, rate_headers, refused, unbudgeted

KEY = ApiKey(id="team-a", models=("*",), rpm=10, tpm=1000)
USAGE = Usage(10, 0, 59.95, 1000, 120, 360.0)


@pytest.mark.parametrize(("seconds", "text"), [(0.0, "0ms"), (0.0121, "13ms"), (1.5, "1.5s"), (59.9991, "60s"), (360, "6m0s"), (61.2, "1m2s")])
def test_durations_read_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_headers_name_each_limit_the_key_has() -> None:
    assert rate_headers(USAGE) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "59.95s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "120",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert rate_headers(Usage(None, 0, 0, None, 0, 0)) == {}


def test_a_refusal_says_which_limit_and_when_to_retry() -> None:
    error = refused(Refusal("tokens", 1000, 880, 200, 0.6435), USAGE, KEY, "chat")
    body = error.to_dict()["error"]
    assert error.status_code == 429
    assert (body["type"], body["code"]) == ("tokens", "rate_limit_exceeded")
    assert body["message"] == (
        "Rate limit reached for chat on API key team-a on tokens per min (TPM): "
        "Limit 1000, Used 880, Requested 200. Please try again in 644ms."
    )
    headers = error.headers()
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "644")
    assert headers["x-ratelimit-remaining-tokens"] == "120"


def test_a_request_that_can_never_fit_says_so_without_a_retry_time() -> None:
    error = refused(Refusal("tokens", 1000, 0, 5000, None), USAGE, KEY, "chat")
    assert "Request too large for chat" in error.message and "retry-after" not in error.headers()


def test_the_output_bound_a_request_leaves_out_is_the_one_its_endpoint_reads() -> None:
    assert unbudgeted("chat", {}) == "max_completion_tokens"
    assert unbudgeted("chat", {"max_tokens": 5}) is unbudgeted("chat", {"max_completion_tokens": 5}) is None
    assert unbudgeted("responses", {}) == "max_output_tokens"
    assert unbudgeted("responses", {"max_output_tokens": 5}) is None
    assert unbudgeted("completion", {}) is unbudgeted("messages", {}) is None  # (16 by default; required)


def test_embedding_bounds_count_every_input() -> None:
    assert embedding_tokens("embedding", {"input": "héllo"}) == 8  # 6 bytes + 2 markers
    assert embedding_tokens("embedding", {"input": ["a", "bb"]}) == 7
    assert embedding_tokens("embedding", {"input": [1, 2, 3]}) == 3
    assert embedding_tokens("embedding", {"input": [[1, 2], [3]]}) == 3


def test_embedding_bounds_count_the_texts_of_predictions_and_tensors_too() -> None:
    # An embedding model reached by :predict or V2 infer is held to the key's
    # tokens as /v1/embeddings is.
    assert embedding_tokens("predict", {"instances": ["a", "bb"]}) == 7
    assert embedding_tokens("predict", {"inputs": ["héllo"]}) == 8
    tensor = {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "bb"]}
    assert embedding_tokens("infer", {"inputs": [tensor]}) == 7
    assert embedding_tokens("infer", {"inputs": [{**tensor, "data": [["a"], ["bb"]]}]}) == 7
    assert embedding_tokens("infer", {"inputs": "nonsense"}) == 0  # refused later, by the replica


def test_no_embedding_input_counts_more_than_the_models_window() -> None:
    # A longer input is refused by the model: reserving its bytes refused a key
    # with a small token limit "request too large" for a text the model takes.
    long = "word " * 2_000
    assert embedding_tokens("embedding", {"input": long}, window=256) == 256
    assert embedding_tokens("embedding", {"input": [long, "a"]}, window=256) == 256 + 3
    assert embedding_tokens("embedding", {"input": list(range(1_000))}, window=256) == 256  # one input
    assert embedding_tokens("embedding", {"input": [list(range(1_000)), [1, 2]]}, window=256) == 256 + 2
    tensor = {"name": "t", "shape": [2, 1], "datatype": "BYTES", "data": [[long], ["bb"]]}
    assert embedding_tokens("infer", {"inputs": [tensor]}, window=256) == 256 + 4
    assert embedding_tokens("predict", {"instances": [long, long]}, window=256) == 512
    assert embedding_tokens("embedding", {"input": long}) == 10_002  # window unknown: the bytes


async def test_what_spends_nothing_carries_the_keys_headers_and_no_503_when_the_ledger_is_away() -> None:
    from gateway.auth.local import LocalLimiter
    from gateway.errors import ServiceUnavailableError
    from gateway.http.limits import usage_headers

    key = ApiKey("team", ("*",), rpm=10)
    assert (await usage_headers(LocalLimiter(), key))["x-ratelimit-remaining-requests"] == "10"

    class Away:
        async def usage(self, *_: object) -> None:
            raise ServiceUnavailableError("Rate limits cannot be checked right now; please retry shortly.")

    assert await usage_headers(Away(), key) == {}  # (a cancel must still reach its response)
