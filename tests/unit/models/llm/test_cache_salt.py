"""models/llm/cache_salt.py: no API key shares vLLM's cached prefixes with another."""

from __future__ import annotations

from typing import Any

import pytest

from models.llm import cache_salt, vllm_errors


def parsed_chat(**fields: Any) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return vllm_errors.validated(ChatCompletionRequest, body)


def salted(owner: str, **fields: Any) -> str | None:
    parsed = parsed_chat(**fields)
    cache_salt.salt(parsed, owner)
    return parsed.cache_salt


def test_each_key_gets_a_salt_of_its_own_and_keeps_it() -> None:
    assert salted("team-a") == salted("team-a")  # a key's own requests share their prefixes
    assert salted("team-a") != salted("team-b")
    assert salted("team-a") is not None and "team-a" not in str(salted("team-a"))


def test_a_clients_own_salt_still_separates_that_keys_users_and_cannot_name_another_keys() -> None:
    mine = salted("team-a", cache_salt="user-1")
    assert mine not in (salted("team-a"), salted("team-a", cache_salt="user-2"))
    assert salted("team-b", cache_salt="user-1") != mine
    assert salted("team-b", cache_salt=salted("team-a")) != salted("team-a")  # naming another's salt gets a third


def test_an_open_gateway_leaves_the_request_as_the_client_sent_it() -> None:
    assert salted("") is None
    assert salted("", cache_salt="mine") == "mine"


def test_a_salt_made_here_is_one_vllm_takes() -> None:
    from vllm.entrypoints.generate.base.protocol import validate_cache_salt

    validate_cache_salt(cache_salt.salt_for("team-a", "user-1"))


@pytest.mark.parametrize("schema", ["messages", "completion"])
def test_every_generating_request_is_salted(schema: str) -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    parsed = (
        vllm_errors.validated(AnthropicMessagesRequest, {"model": "m", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        if schema == "messages" else vllm_errors.validated(CompletionRequest, {"model": "m", "prompt": "hi"})
    )  # fmt: skip
    cache_salt.salt(parsed, "team-a")
    assert parsed.cache_salt == cache_salt.salt_for("team-a", None)
