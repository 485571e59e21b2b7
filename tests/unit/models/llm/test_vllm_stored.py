"""models/llm/vllm_stored.py: stored responses under vLLM, where its own handling falls short."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from gateway.protocol.engine import EngineRequest
from models.llm import vllm_stored, vllm_streams
from models.llm.tally import GenerationTally


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


class Kept(SimpleNamespace):
    def model_dump_json(self, by_alias: bool = False) -> str:
        return f'{{"status": "{self.status}"}}'


class Responses(SimpleNamespace):
    """vLLM's Responses serving layer, as far as cancelling goes: its cancel stops the task."""

    async def cancel_responses(self, response_id: str) -> Any:
        kept = self.response_store[response_id]
        kept.status = "cancelled"
        self.background_tasks[response_id].cancel()
        return kept


@pytest.mark.parametrize("how", ["cancel", "delete", "drop"])
async def test_a_background_response_stopped_before_its_end_counts_what_its_engine_request_used(how: str) -> None:
    # A whole answer's engine request shows no output before its end; the
    # tally knows how to ask the engine what it used so far (its prompt, 5
    # tokens generated), which the engine forgets once the request is stopped.
    tally = GenerationTally()
    asked: list[bool] = []
    tally.unseen.add(lambda: (asked.append(True), (7, 5))[1])  # type: ignore[func-returns-value]
    generating = asyncio.ensure_future(asyncio.Event().wait())
    vllm_stored.counted(generating, tally)
    responses = Responses(
        response_store={"resp_a": Kept(status="in_progress", background=True)},
        msg_store={}, event_store={}, background_tasks={"resp_a": generating},
    )
    serving = SimpleNamespace(responses=responses, error_response=type(None))
    if how == "cancel":
        call = EngineRequest("responses_cancel", {"response_id": "resp_a"}, "req", "m")
        body = await vllm_stored.answer(serving, "m", call, GenerationTally())  # type: ignore[arg-type]
        assert body == b'{"status": "cancelled"}'
    elif how == "delete":
        await vllm_stored.delete_response(serving, "resp_a")  # type: ignore[arg-type]
    else:
        vllm_stored.forget_response(serving, "resp_a")  # type: ignore[arg-type]
    await asyncio.gather(generating, return_exceptions=True)
    assert generating.cancelled() and asked == [True]  # asked before it was stopped
    assert (tally.prompt_tokens, tally.completion_tokens) == (7, 5)  # what the key is charged


async def test_a_background_generation_that_ends_leaves_nothing_behind() -> None:
    finishing = asyncio.ensure_future(asyncio.sleep(0))
    tally = GenerationTally()
    tally.continues = finishing  # (the tally holds its task)
    vllm_stored.counted(finishing, tally)
    await finishing
    await asyncio.sleep(0)  # (its done callbacks run)
    assert finishing not in vllm_stored._TALLIES


@pytest.mark.parametrize("error", [{"code": "invalid_prompt", "message": "bad"}, {"code": "server_error", "message": "x"}])
async def test_a_failed_background_response_read_again_ends_with_its_error_as_it_did_live(error: dict[str, str]) -> None:
    """Its task ended (and vLLM dropped it) before the read began: the
    events kept end with no terminal one, so the stream would just stop."""
    created = SimpleNamespace(type="response.created", sequence_number=0)
    kept = [created, SimpleNamespace(type="response.in_progress", sequence_number=1)]
    for event in kept:
        event.model_dump_json = lambda indent, by_alias, event=event: (
            f'{{"type":"{event.type}","sequence_number":{event.sequence_number}}}'
        )
    stored = SimpleNamespace(status="failed", background=True, error=error)
    responses = SimpleNamespace(
        response_store={"resp_1": stored}, event_store={"resp_1": (kept, asyncio.Event())}, background_tasks={}
    )
    serving = SimpleNamespace(responses=responses)
    for after, seen in ((None, 2), (1, 0), (5, 0)):
        events = vllm_stored.background_events(serving, "resp_1", after)
        frames = [frame async for frame in vllm_streams.events(events, GenerationTally(), after=after)]
        assert len(frames) == seen + 1
        last = json.loads(frames[-1].split(b"data: ", 1)[1])
        assert (last["type"], last["code"], last["message"]) == ("error", error["code"], error["message"])
        assert last["sequence_number"] == (1 if after is None else after) + 1  # after the last one sent


async def test_a_background_response_says_in_progress_once_its_queued_answer_is_made() -> None:
    stored = {"resp_1": SimpleNamespace(status="queued"), "resp_2": SimpleNamespace(status="queued")}
    serving = SimpleNamespace(responses=SimpleNamespace(response_store=stored))
    running, ended = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
    ended.set_result(None)
    vllm_stored.in_progress_soon(serving, "resp_1", running)
    vllm_stored.in_progress_soon(serving, "resp_2", ended)
    assert stored["resp_1"].status == "queued"  # the answer being made now says queued, as OpenAI's
    await asyncio.sleep(0)
    assert (stored["resp_1"].status, stored["resp_2"].status) == ("in_progress", "queued")
    running.cancel()


async def test_a_background_stream_vllm_ended_on_its_own_error_event_is_failed_not_in_progress_for_ever() -> None:
    """vLLM's stream of a generation that fails writes an error event and ends
    its task without an exception, leaving the stored response unfinished."""
    kept = SimpleNamespace(status="in_progress", background=True)
    events = [SimpleNamespace(type="response.created"), SimpleNamespace(type="error", message="the engine failed")]
    responses = SimpleNamespace(response_store={"resp_1": kept}, event_store={"resp_1": (events, asyncio.Event())})
    serving = SimpleNamespace(responses=responses)
    task = asyncio.get_running_loop().create_future()
    vllm_stored.mark_failure(serving, "resp_1", task)
    task.set_result(None)
    await asyncio.sleep(0)
    assert kept.status == "failed" and kept.error == {"code": "server_error", "message": "the engine failed"}
    # One that completed (vLLM stored its answer) stays as it is.
    done = SimpleNamespace(status="completed", background=True)
    responses.response_store["resp_2"] = done
    finished = asyncio.get_running_loop().create_future()
    vllm_stored.mark_failure(serving, "resp_2", finished)
    finished.set_result(None)
    await asyncio.sleep(0)
    assert done.status == "completed"
