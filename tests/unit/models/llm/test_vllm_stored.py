"""models/llm/vllm_stored.py: stored responses under vLLM, where its own handling falls short."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from models.llm import vllm_stored


def serving_keeping(**responses: SimpleNamespace) -> Any:
    return SimpleNamespace(responses=SimpleNamespace(response_store=responses))


@pytest.mark.parametrize(
    ("kept", "said"),
    [
        (SimpleNamespace(status="completed", background=False), "can be cancelled; this one was answered at once"),
        (SimpleNamespace(status="completed", background=True), "still queued or in progress .*; this one is completed"),
        (SimpleNamespace(status="failed", background=True), "this one is failed"),
    ],
)
def test_a_response_that_cannot_be_cancelled_says_why(kept: SimpleNamespace, said: str) -> None:
    """vLLM calls every such response "a synchronous response", background ones that ended included."""
    with pytest.raises(InvalidRequestError, match=said) as raised:
        vllm_stored.check_cancellable(serving_keeping(resp_a=kept), "resp_a")
    assert raised.value.param == "response_id"


@pytest.mark.parametrize("status", ["queued", "in_progress"])
def test_a_running_background_response_or_an_unknown_one_is_left_to_vllm(status: str) -> None:
    serving = serving_keeping(resp_a=SimpleNamespace(status=status, background=True))
    assert vllm_stored.check_cancellable(serving, "resp_a") is None
    assert vllm_stored.check_cancellable(serving, "resp_unknown") is None  # vLLM answers its 404


def test_cancelling_a_cancelled_background_response_answers_it_again() -> None:
    cancelled = SimpleNamespace(status="cancelled", background=True)
    assert vllm_stored.check_cancellable(serving_keeping(resp_a=cancelled), "resp_a") is cancelled


@pytest.mark.parametrize("status", ["queued", "in_progress"])
def test_a_follow_up_on_a_response_still_generating_is_refused(status: str) -> None:
    serving = serving_keeping(resp_a=SimpleNamespace(status=status, background=True))
    with pytest.raises(InvalidRequestError, match=f"'resp_a' is still {status}") as raised:
        vllm_stored.check_previous(serving, "resp_a")
    assert raised.value.param == "previous_response_id"


@pytest.mark.parametrize("status", ["completed", "incomplete", "failed", "cancelled"])
def test_a_follow_up_on_an_ended_or_unknown_response_is_left_to_the_engine(status: str) -> None:
    serving = serving_keeping(resp_a=SimpleNamespace(status=status, background=True))
    vllm_stored.check_previous(serving, "resp_a")
    vllm_stored.check_previous(serving, "resp_unknown")  # the replica's store answers its 404
    vllm_stored.check_previous(serving, None)


async def test_a_response_dropped_while_it_generates_in_the_background_is_stopped() -> None:
    generating = asyncio.ensure_future(asyncio.Event().wait())
    done = asyncio.ensure_future(asyncio.sleep(0))
    await done
    kept = SimpleNamespace(status="in_progress", background=True)
    responses = SimpleNamespace(
        response_store={"resp_a": kept, "resp_b": kept}, msg_store={"resp_a": [], "resp_b": []},
        event_store={"resp_a": None}, background_tasks={"resp_a": generating, "resp_b": done},
    )
    vllm_stored.forget_response(SimpleNamespace(responses=responses), "resp_a")
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(generating, 2)  # no one can reach it any more: its generation stops
    assert "resp_a" not in responses.response_store and "resp_a" not in responses.msg_store
    assert "resp_a" not in responses.event_store
    vllm_stored.forget_response(SimpleNamespace(responses=responses), "resp_b")  # one that ended: only dropped
    assert responses.response_store == {} and not done.cancelled()
