"""gateway/auth/prompt_count.py: counts as the engines count, budgets as vLLM reserves."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth.prompt_count import WordCounter, _tool, counter_for, most_tokens
from gateway.config import EchoModelConfig
from gateway.protocol.engine import EngineRequest
from models.llm.echo import EchoEngine

BODIES: list[tuple[str, dict[str, Any]]] = [
    ("chat", {"messages": [{"role": "user", "content": "one two  three"}]}),
    ("chat", {"messages": [{"role": "system", "content": "be  brief"}, {"role": "user", "content": [
        {"type": "text", "text": "a b"}, {"type": "text", "text": " c"}]}]}),
    ("completion", {"prompt": "x y z"}),
    ("completion", {"prompt": ["x y", "z"]}),
]


@pytest.mark.parametrize(("endpoint", "body"), BODIES)
async def test_the_word_counter_counts_as_the_echo_engine(endpoint: str, body: dict[str, Any]) -> None:
    engine = EchoEngine(EchoModelConfig(name="echo"))
    request = {"model": "echo", "max_tokens": 2, **body}
    counted = WordCounter().prompt_tokens(endpoint, request)
    assert counted is not None
    plan = engine._plan(EngineRequest(endpoint, request, "r"))  # type: ignore[arg-type]
    assert sum(counted) == plan.prompt_tokens
    assert counter_for(engine.info().tokenizer) is not None


def test_budgets_are_per_choice_and_per_prompt() -> None:
    assert most_tokens([10], {"max_tokens": 5}, 100, "chat") == 15
    assert most_tokens([10], {"max_tokens": 5, "n": 3}, 100, "chat") == 25
    assert most_tokens([10, 20], {"max_completion_tokens": 4, "max_tokens": 9}, 100, "chat") == 38
    assert most_tokens([10], {}, 100, "chat") == 100  # the rest of the window
    assert most_tokens([10], {}, None, "chat") is None
    assert most_tokens([10], {"n": "2"}, 100, "chat") is None


def test_a_completion_without_a_budget_reserves_the_16_tokens_it_may_generate_not_the_window() -> None:
    # As OpenAI and vLLM default it, also when sent as null; chat's default is the window's rest.
    assert most_tokens([10], {}, 2048, "completion") == 26
    assert most_tokens([10], {"max_tokens": None, "n": 4}, 2048, "completion") == 10 + 4 * 16
    assert most_tokens([10, 20], {"max_tokens": 100}, 2048, "completion") == 230
    assert most_tokens([10], {}, 2048, "chat") == 2048


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": -1_000_000_000},  # would give the key tokens back
        {"max_tokens": -(10**4299)},  # would give back more than any header can say
        {"max_completion_tokens": -5, "max_tokens": 5},
        {"max_tokens": True},
        {"max_tokens": 5, "n": -3},
        {"max_tokens": 91},  # beyond the window with the prompt: the engine refuses it 400, not a limit 429
        {"max_tokens": 10**4299},
    ],
)
def test_a_budget_the_engine_would_refuse_is_left_to_the_replica_to_refuse(body: dict[str, object]) -> None:
    assert most_tokens([10], body, 100, "chat") is None


def test_a_prompt_that_fills_the_window_is_left_to_the_replica_to_refuse() -> None:
    assert most_tokens([99], {}, 100, "chat") == 100
    assert most_tokens([100], {}, 100, "chat") is None  # no room for one token
    assert most_tokens([10, 100], {}, 100, "chat") is None
    assert most_tokens([10], {"max_tokens": 5}, None, "chat") is None  # no window to check the budget against


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "f", "strict": True}},
        {"type": "function", "function": {"name": "f", "strict": False, "parameters": {}}},
    ],
)
def test_tools_reach_the_template_as_vllm_dumps_them(tool: dict[str, Any]) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    assert _tool(tool) == ChatCompletionToolsParam.model_validate(tool).model_dump()


def test_deferred_tools_are_left_to_the_replica() -> None:
    with pytest.raises(ValueError):
        _tool({"type": "function", "function": {"name": "f"}, "defer_loading": True})


def _template_counter() -> Any:
    from pathlib import Path

    tokenizer = Path(__file__).parents[4] / ".models" / "tiny-chat-v1" / "tokenizer.json"
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    spec = {"kind": "hf", "tokenizer": tokenizer.read_text(), "chat_templates": {"plain": template},
            "content_formats": {"plain": "string"}}
    return counter_for(spec)


async def test_a_long_prompt_is_counted_with_the_ingress_loop_running() -> None:
    # Counted on the loop, 1 MB of prompt held every other request on the ingress for a second.
    from gateway.auth import prompt_count
    from tests.unit.loop_ticks import ticking

    counter = _template_counter()
    body = {"messages": [{"role": "user", "content": "some words, and more of them. " * 40_000}]}
    async with ticking() as ticks:
        counted = await prompt_count.count(counter, "chat", body, size=1_200_000)
    assert counted == counter.prompt_tokens("chat", body)
    assert counted is not None and counted[0] > 200_000
    assert ticks.count > 100  # the loop ran throughout, not once at the end
    small = {"messages": [{"role": "user", "content": "two words"}]}
    assert await prompt_count.count(counter, "chat", small, size=60) == counter.prompt_tokens("chat", small)


def test_prompts_of_one_completion_are_counted_each_as_its_own_length() -> None:
    # A tokenizer saved with padding on padded each prompt of a batch to the longest: over-reserved.
    from pathlib import Path

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(__file__).parents[4] / ".models" / "tiny-chat-v1" / "tokenizer.json"))
    tokenizer.enable_padding()
    counter = counter_for({"kind": "hf", "tokenizer": tokenizer.to_str()})
    assert counter is not None
    short, long = counter.prompt_tokens("completion", {"prompt": ["hi", "many more words than the first one has"]})
    assert short < long
