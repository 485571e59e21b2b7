"""models/llm/vllm_streams.py: vLLM's outputs counted and timed into the request's tally."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.metrics.families import ITL_BUCKETS
from models.llm.core_placement import CorePlacer
from models.llm.tally import GenerationTally
from gateway.errors import GatewayError
from models.llm import vllm_streams
from models.llm.vllm_streams import count, messages_converter, named_events
from tests.unit.models.llm.test_core_placement import Recorded


def output(token_counts: list[int], stats: Any = None, prompt: int = 7) -> Any:
    seqs = [SimpleNamespace(index=i, token_ids=[0] * n) for i, n in enumerate(token_counts)]
    return SimpleNamespace(prompt_token_ids=[0] * prompt, outputs=seqs, metrics=stats)


def stats(first_ts: float, last_ts: float, arrival: float = 1000.0, latency: float = 0.25) -> Any:
    return SimpleNamespace(
        first_token_ts=first_ts, last_token_ts=last_ts, arrival_time=arrival, first_token_latency=latency
    )


async def source(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def drain(outputs: AsyncIterator[Any]) -> None:
    async for _ in outputs:
        pass


async def test_a_delta_stream_counts_each_step() -> None:
    tally = GenerationTally(started=1000.0)
    steps = [output([1], stats(50.0, 50.0)), output([1], stats(50.0, 50.02)), output([2], stats(50.0, 50.06))]
    await drain(count(source(steps), tally, delta=True))
    outcome = tally.outcome()
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 4)
    assert outcome.first_token_s == pytest.approx(0.25)
    # Three gaps of 20 ms, bucketed here (0.01 < 0.02 <= 0.025: the second bucket).
    assert outcome.inter_token_counts == (0, 3) + (0,) * (len(ITL_BUCKETS) - 1)
    assert outcome.inter_token_sum_s == pytest.approx(0.06)


async def test_a_final_only_answer_spreads_each_choices_tokens_between_first_and_last() -> None:
    tally = GenerationTally(started=999.9)
    await drain(count(source([output([5, 3], stats(10.0, 10.5))]), tally, delta=False))
    outcome = tally.outcome()
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 8)
    assert outcome.first_token_s == pytest.approx(0.35)
    # Each choice over the same 0.5 s: four gaps of 125 ms, two of 250 ms
    # (all 8 tokens spread as one sequence made each gap about a choice's half).
    assert outcome.inter_token_counts[ITL_BUCKETS.index(0.15)] == 4
    assert outcome.inter_token_counts[ITL_BUCKETS.index(0.3)] == 2 == sum(outcome.inter_token_counts) - 4
    assert outcome.inter_token_sum_s == pytest.approx(1.0)


async def test_several_choices_streamed_are_each_timed_on_their_own() -> None:
    # vLLM streams each choice's step as an output of its own, one step's
    # outputs with one timestamp: timed together, every sibling's gap was 0.
    tally = GenerationTally(started=1000.0)

    def step(index: int, last: float) -> Any:
        out = output([1], stats(50.0, last))
        out.outputs[0].index = index
        return out

    steps = [step(0, 50.0), step(1, 50.0), step(0, 50.02), step(1, 50.02), step(0, 50.04), step(1, 50.04)]
    await drain(count(source(steps), tally, delta=True))
    outcome = tally.outcome()
    assert outcome.completion_tokens == 6
    assert outcome.inter_token_counts == (0, 4) + (0,) * (len(ITL_BUCKETS) - 1)  # four gaps of 20 ms
    assert outcome.inter_token_sum_s == pytest.approx(0.08)


async def test_two_prompts_of_one_request_add_up() -> None:
    tally = GenerationTally()
    await drain(count(source([output([3])]), tally, delta=False))
    await drain(count(source([output([2], prompt=4)]), tally, delta=False))
    assert (tally.prompt_tokens, tally.completion_tokens) == (11, 5)


async def test_the_prompts_cached_tokens_are_counted_once_per_engine_request() -> None:
    # vLLM says on each output how many prompt tokens its prefix cache held.
    tally = GenerationTally()
    first, later = output([1], prompt=40), output([1], prompt=40)
    first.num_cached_tokens, later.num_cached_tokens = 32, 32
    await drain(count(source([first, later]), tally, delta=True))
    await drain(count(source([output([1], prompt=8)]), tally, delta=True))  # an engine that says nothing
    assert (tally.prompt_tokens, tally.cached_tokens) == (48, 32)
    assert tally.outcome().cached_tokens == 32


async def test_stopping_early_closes_the_engine_stream() -> None:
    closed = []

    async def engine() -> AsyncIterator[Any]:
        try:
            for _ in range(10):
                yield output([1])
        finally:
            closed.append(True)

    tally = GenerationTally()
    counted = count(engine(), tally, delta=True)
    await anext(counted)
    await counted.aclose()
    assert closed == [True] and tally.completion_tokens == 1


async def test_a_whole_answer_stopped_before_its_output_counts_what_the_engine_used() -> None:
    # vLLM gives a non-streaming request's output only at its end: stopped
    # before then (its caller left), the engine is asked what it had used.
    asked: list[str] = []

    def used() -> tuple[int, int]:
        asked.append("asked")
        return 12, 40

    async def engine() -> AsyncIterator[Any]:
        await asyncio.sleep(30)  # generating, final output only
        yield output([64])

    tally = GenerationTally()
    counted = asyncio.ensure_future(drain(count(engine(), tally, delta=False, used=used)))
    await asyncio.sleep(0.01)
    tally.count_unseen()  # as the replica does before it stops the work
    counted.cancel()
    await asyncio.gather(counted, return_exceptions=True)
    assert (tally.prompt_tokens, tally.completion_tokens, asked) == (12, 40, ["asked"])
    tally.count_unseen()  # nothing is counted twice
    assert (tally.prompt_tokens, tally.completion_tokens) == (12, 40)


async def test_outputs_seen_are_counted_from_themselves_not_asked_again() -> None:
    tally = GenerationTally()
    await drain(count(source([output([5])]), tally, delta=False, used=lambda: (1000, 1000)))
    tally.count_unseen()
    assert (tally.prompt_tokens, tally.completion_tokens) == (7, 5)
    streamed = GenerationTally()
    await drain(count(source([output([5])]), streamed, delta=True, used=lambda: (1000, 1000)))
    streamed.count_unseen()  # deltas are counted as they come: never asked
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (7, 5)


async def test_a_request_generates_from_its_first_read_until_its_end_or_close() -> None:
    """The engine core's placement counts a request as generating while its
    outputs are read: from the first read on, until they end or are closed
    early (a client gone); outputs never read count for nothing."""
    placement = Recorded()
    placer = CorePlacer(placement, "auto")
    unread = count(source([output([1])]), GenerationTally(), True, placer)
    ended = count(source([output([1]), output([1])]), GenerationTally(), True, placer)
    closed = count(source([output([1]), output([1])]), GenerationTally(), True, placer)
    await anext(ended)
    await anext(closed)
    assert placer.generating == 2
    await drain(ended)
    assert placer.generating == 1
    await closed.aclose()
    assert placer.generating == 0
    await unread.aclose()
    assert placer.generating == 0


async def test_the_placer_learns_each_requests_tokens_as_they_pass() -> None:
    learned: list[int] = []
    placer = CorePlacer(Recorded(), "auto")
    placer.produced = learned.append  # type: ignore[method-assign]
    tally = GenerationTally()
    await drain(count(source([output([1, 2]), output([]), output([3])]), tally, True, placer))
    assert learned == [3, 3] and tally.completion_tokens == 6  # two sequences' tokens, then none, then one's


async def test_tokens_are_counted_as_they_pass_not_when_the_stream_is_closed() -> None:
    """A reader that stops at a ``yield`` (the replica found the client gone)
    leaves the generator to be closed later, when collected; what it let
    through is counted already, for the outcome reported at once."""

    async def engine() -> AsyncIterator[Any]:
        for _ in range(10):
            yield output([2])

    tally = GenerationTally()
    counted = count(engine(), tally, delta=True)
    await anext(counted)
    await anext(counted)
    assert (tally.prompt_tokens, tally.completion_tokens) == (7, 4)
    await counted.aclose()
    assert tally.completion_tokens == 4


def _chunk(**delta: Any) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    return "data: " + json.dumps({"id": "c", "model": "m", "created": 1, "choices": [choice]}) + "\n\n"


ENGINE_ERROR = 'data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", ' \
    '"param": null, "code": 500}}\n\n'
REFUSED = 'data: {"error": {"message": "The grammar is invalid.", "type": "BadRequestError", ' \
    '"param": null, "code": 400}}\n\n'


class ChatStream:
    """A chat stream as vLLM's chat serving yields it, which records being closed."""

    def __init__(self, frames: list[str]) -> None:
        self.frames, self.closed = frames, False

    async def __call__(self) -> AsyncIterator[str]:
        try:
            for frame in frames_with_done(self.frames):
                yield frame
        finally:
            self.closed = True


def frames_with_done(frames: list[str]) -> list[str]:
    return [*frames, "data: [DONE]\n\n"]


def converted(chat: ChatStream, dead: bool = False) -> AsyncIterator[Any]:
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    # vLLM's own converter (it keeps no state on the serving object).
    convert = functools.partial(AnthropicServingMessages.message_stream_converter, None)
    return messages_converter(convert, lambda: dead)(chat())


async def sent(events: AsyncIterator[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    async for frame in events:
        head, data = frame.decode().split("\n", 1)
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


@pytest.mark.parametrize(
    ("dead", "kind", "code", "status"),
    [(True, "overloaded_error", "service_unavailable", 503), (False, "api_error", "internal_error", 500)],
)
async def test_a_messages_stream_that_fails_midway_ends_with_anthropics_error_event(
    dead: bool, kind: str, code: str, status: int
) -> None:
    chat = ChatStream([_chunk(role="assistant", content=""), _chunk(content="Hel"), ENGINE_ERROR])
    tally = GenerationTally(started=0.0)
    events = await sent(named_events(converted(chat, dead), tally))
    names = [name for name, _ in events]
    assert "content_block_delta" in names and "message_stop" not in names
    name, error = events[-1]
    assert name == "error" and error["type"] == "error" and error["error"]["type"] == kind
    assert "validation" not in error["error"]["message"]  # vLLM's converter's own words about its types
    assert chat.closed and tally.outcome().error_status == status and tally.outcome().error == code


async def test_a_messages_stream_refused_before_its_first_event_is_an_http_error() -> None:
    chat = ChatStream([REFUSED])
    with pytest.raises(GatewayError) as caught:
        await sent(named_events(converted(chat), GenerationTally(started=0.0)))
    assert caught.value.status_code == 400 and caught.value.message == "The grammar is invalid."
    assert chat.closed


async def test_a_messages_stream_without_failure_is_vllms_conversion_and_closing_it_closes_the_chat_stream() -> None:
    chat = ChatStream([_chunk(role="assistant", content=""), _chunk(content="Hi")])
    events = await sent(named_events(converted(chat), GenerationTally(started=0.0)))
    assert [name for name, _ in events][-1] == "message_stop" and chat.closed
    chat = ChatStream([_chunk(role="assistant", content=""), *[_chunk(content="x")] * 20])
    stream = named_events(converted(chat), GenerationTally(started=0.0))
    await anext(stream)
    await stream.aclose()  # the client hung up
    assert chat.closed


class Searching:
    """Stands in for a vLLM serving object: its beam search runs only as it is read."""

    async def beam_search(self, prompt: Any, request_id: str, params: Any) -> AsyncIterator[Any]:
        for _ in range(3):  # the search's steps make no output of their own
            await asyncio.sleep(0)
        yield SimpleNamespace(finished=True, **vars(output([5, 4], prompt=11)))


def test_a_streamed_beam_search_counts_its_answer_once_it_is_read_outside_the_request() -> None:
    # vLLM makes the search's generator while the request is served and runs
    # it as the stream is read, once the tally is no longer the context's.
    serving, tally = Searching(), GenerationTally()
    vllm_streams.count_beams(serving)
    token = vllm_streams.TALLY.set(tally)
    try:
        searched = serving.beam_search({"prompt_token_ids": [1]}, "r", None)
    finally:
        vllm_streams.TALLY.reset(token)
    assert (tally.prompt_tokens, tally.completion_tokens) == (0, 0)
    assert searched.ag_code.co_name == "_beams_counted"
    asyncio.run(drain(searched))
    assert (tally.prompt_tokens, tally.completion_tokens) == (11, 9)  # the prompt once, each beam's tokens
    assert tally.first_token_s is not None
    # Outside a request (no tally), the search is vLLM's own generator.
    assert serving.beam_search({}, "r", None).ag_code.co_name == "beam_search"
    vllm_streams.count_beams(None)  # a model without that endpoint


def responses_event(kind: str, status: str | None = None, text: str = "") -> Any:
    """One of vLLM's Responses events, as ``events`` reads it."""
    payload: dict[str, Any] = {}
    if status is not None:  # (vLLM's fields in its order: the response first, the event's type last)
        payload["response"] = {"status": status, "output_text": text, "metadata": {"type": "response.completed"}}
    payload.update(sequence_number=3, type=kind)

    def dumped(indent: None, by_alias: bool) -> str:
        return json.dumps(payload, separators=(",", ":"))

    response = SimpleNamespace(status=status)
    return SimpleNamespace(type=kind, sequence_number=3, response=response, model_dump_json=dumped)


@pytest.mark.parametrize("status", ["incomplete", "completed"])
async def test_a_responses_stream_cut_short_ends_with_response_incomplete_as_openais_does(status: str) -> None:
    # vLLM ends every stream with response.completed, whatever the response's status.
    text = 'as "type":"response.completed" says'  # (quoted in the text, or as the client's metadata: left as is)
    final = responses_event("response.completed", status, text)
    frames = [frame async for frame in vllm_streams.events(source([final]), GenerationTally())]
    kind, data = frames[0].decode().removesuffix("\n\n").split("\n")
    payload = json.loads(data.removeprefix("data: "))
    expected = "response.incomplete" if status == "incomplete" else "response.completed"
    assert (kind, payload["type"]) == (f"event: {expected}", expected)
    assert payload["response"] == {"status": status, "output_text": text, "metadata": {"type": "response.completed"}}


async def test_a_responses_stream_left_early_closes_vllms_at_once() -> None:
    # Not when the dropped generators are collected, layer by layer: the engine request ends with the read.
    closed = []

    async def engine() -> AsyncIterator[Any]:
        try:
            for _ in range(10):
                yield responses_event("response.output_text.delta")
        finally:
            closed.append(True)

    framed = vllm_streams.events(engine(), GenerationTally())
    await anext(framed)
    await framed.aclose()  # type: ignore[attr-defined]
    assert closed == [True]
