"""gateway/http/relay.py with models/llm/relay.py, for real: whole (non-streaming) answers over a
replica's own port, their errors and outcomes, a caller that leaves, and background responses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from gateway.http.relay import ReplicaRelay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.relay import StreamServer
from models.llm.tally import GenerationTally
from tests.unit.gateway.http.test_relay import OUTCOME, Router


async def whole(reply: Reply | BaseException, started: asyncio.Event, cancelled: asyncio.Event) -> Any:
    async def answer(request: EngineRequest, tally: Any = None) -> Reply:
        started.set()
        try:
            await asyncio.sleep(0.01 if not isinstance(reply, BaseException) else 0)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        if isinstance(reply, BaseException):
            raise reply
        if reply.body == b"slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return reply

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    return await StreamServer(no_streams, "127.0.0.1", answer=answer).start()


async def test_a_whole_answer_arrives_with_its_outcome() -> None:
    body = b'{"choices":[{"text":"hi"}]}'
    address = await whole(Reply(body, OUTCOME), asyncio.Event(), asyncio.Event())
    reply = await ReplicaRelay(Router(address)).call(EngineRequest("chat", {"model": "m"}, "r", "m"))
    assert reply == Reply(body, OUTCOME)


async def test_a_whole_answers_error_arrives_as_raised() -> None:
    error = InvalidRequestError("bad", param="max_tokens")
    address = await whole(error, asyncio.Event(), asyncio.Event())
    with pytest.raises(InvalidRequestError) as caught:
        await ReplicaRelay(Router(address)).call(EngineRequest("chat", {"model": "m"}, "r", "m"))
    assert caught.value.to_dict() == error.to_dict()


async def test_cancelling_a_whole_answer_stops_the_replicas_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    address = await whole(Reply(b"slow", OUTCOME), started, cancelled)
    call = asyncio.ensure_future(ReplicaRelay(Router(address)).call(EngineRequest("chat", {}, "r", "m")))
    await asyncio.wait_for(started.wait(), timeout=2)
    await asyncio.sleep(0.05)
    call.cancel()
    await asyncio.wait_for(cancelled.wait(), timeout=2)


async def abandoned_outcome(generating: Callable[[Any], None], stopped_as: Exception | None = None) -> Outcome | None:
    """What an ingress whose caller left hears from a replica whose answer
    (``generating`` its tally) was still under way; ``stopped_as``: what
    the answer raises once cancelled, instead of the cancellation."""
    started = asyncio.Event()

    async def answer(request: EngineRequest, tally: Any) -> Reply:
        generating(tally)
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if stopped_as is not None:
                raise stopped_as from None
            raise
        raise AssertionError("not cancelled")

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    address = await StreamServer(no_streams, "127.0.0.1", answer=answer).start()
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(
        ReplicaRelay(Router(address)).call(EngineRequest("chat", {}, "r", "m"), reported.set_result)
    )
    await asyncio.wait_for(started.wait(), timeout=2)
    call.cancel()  # its client left (or its deadline passed)
    return await asyncio.wait_for(reported, timeout=3)


async def test_an_abandoned_whole_answer_reports_what_was_generated() -> None:
    def generated(tally: Any) -> None:
        tally.prompt_tokens, tally.completion_tokens = 5, 7  # before the client left

    outcome = await abandoned_outcome(generated)
    assert outcome is not None and (outcome.prompt_tokens, outcome.completion_tokens) == (5, 7)


async def test_an_abandoned_whole_answer_whose_engine_answers_the_cancel_with_an_error_reports_what_was_generated() -> None:
    # vLLM's chat, completions and Responses servers catch the cancel and return an error
    # response: the replica answered it as a 400, and the key was charged its whole reservation.
    def generated(tally: Any) -> None:
        tally.prompt_tokens, tally.completion_tokens = 5, 7

    outcome = await abandoned_outcome(generated, InvalidRequestError("Client disconnected"))
    assert outcome is not None and (outcome.prompt_tokens, outcome.completion_tokens) == (5, 7)


async def test_a_whole_answer_abandoned_before_the_engines_output_reports_what_the_engine_used() -> None:
    # vLLM shows a non-streaming request's tokens only at its end: asked before it is stopped.
    outcome = await abandoned_outcome(lambda tally: tally.unseen.add(lambda: (9, 31)))
    assert outcome is not None and (outcome.prompt_tokens, outcome.completion_tokens) == (9, 31)


async def test_a_whole_answer_abandoned_in_the_replicas_queue_reports_nothing_generated() -> None:
    started, answered = asyncio.Event(), []

    async def answer(request: EngineRequest, tally: Any) -> Reply:
        answered.append(request.request_id)
        started.set()
        await asyncio.sleep(30)  # holds the replica's one place
        raise AssertionError("not cancelled")

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    address = await StreamServer(no_streams, "127.0.0.1", max_ongoing=1, answer=answer).start()
    relay_ = ReplicaRelay(Router(address))
    running = asyncio.ensure_future(relay_.call(EngineRequest("chat", {}, "first", "m")))
    await asyncio.wait_for(started.wait(), timeout=2)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    queued = asyncio.ensure_future(relay_.call(EngineRequest("chat", {}, "queued", "m"), reported.set_result))
    await asyncio.sleep(0.05)  # reached the replica's queue
    queued.cancel()  # its client left while it waited
    # Not None ("unknown", which keeps a key's whole reservation): nothing was generated.
    assert await asyncio.wait_for(reported, timeout=3) == Outcome()
    assert answered == ["first"]
    running.cancel()
    await asyncio.gather(running, queued, return_exceptions=True)


async def test_a_background_answer_comes_at_once_and_its_outcome_once_generated() -> None:
    """A background response: the body before the generation ends, the outcome after."""
    generating = asyncio.Event()

    async def answer(request: EngineRequest, tally: GenerationTally) -> Reply:
        async def generate() -> None:
            await generating.wait()
            tally.prompt_tokens, tally.completion_tokens = 4, 9

        tally.continues = asyncio.ensure_future(generate())
        return Reply(b'{"status":"queued"}', tally.outcome())

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    address = await StreamServer(no_streams, "127.0.0.1", answer=answer).start()
    outcomes: list[Outcome | None] = []
    ended = asyncio.Event()

    def later(outcome: Outcome | None) -> None:
        outcomes.append(outcome)
        ended.set()

    call = EngineRequest("responses", {"model": "m", "background": True}, "r", "m")
    replicas = ReplicaRelay(Router(address))
    reply = await asyncio.wait_for(replicas.call(call, later=later), timeout=2)
    assert reply == Reply(b'{"status":"queued"}', Outcome()) and outcomes == []
    assert replicas._open == {address: 1}  # still generating there: the relay balances by it
    generating.set()
    await asyncio.wait_for(ended.wait(), timeout=2)
    assert outcomes == [Outcome(prompt_tokens=4, completion_tokens=9)]
    assert replicas._open == {address: 0}
