"""gateway/http/gather.py: concurrent requests to a batched model share calls."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import ClassicalModelConfig
from gateway.errors import OverloadedError
from gateway.http.gather import Gatherer, Gathering


class Replica:
    """Answers each group after ``release`` is set; records the groups it got."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.cancelled: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail_with: BaseException | None = None

    async def send(self, calls: list[str]) -> list[Any]:
        self.groups.append(list(calls))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(list(calls))
            raise
        if self.fail_with is not None:
            raise self.fail_with
        return [ValueError(f"bad {c}") if c.startswith("bad") else f"answer to {c}" for c in calls]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_request_that_finds_a_free_slot_leaves_at_once_alone() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    answer = gatherer.submit("a")
    await settle()
    assert replica.groups == [["a"]]
    replica.release.set()
    assert await answer == "answer to a"


async def test_requests_that_wait_leave_together_in_order_up_to_the_group_cap() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=3, max_in_flight=1)
    futures = [gatherer.submit(c) for c in "abcdef"]
    await settle()
    assert replica.groups == [["a"]]  # b..f wait for the one call in flight
    replica.release.set()
    answers = await asyncio.gather(*futures)
    assert answers == [f"answer to {c}" for c in "abcdef"]
    assert replica.groups == [["a"], ["b", "c", "d"], ["e", "f"]]


async def test_calls_in_flight_are_capped_per_gatherer() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=2)
    futures = [gatherer.submit(c) for c in "abcde"]
    await settle()
    assert replica.groups == [["a"], ["b"]]
    replica.release.set()
    await asyncio.gather(*futures)
    assert replica.groups == [["a"], ["b"], ["c", "d", "e"]]


async def test_an_error_meant_for_one_request_reaches_it_alone() -> None:
    replica = Replica()
    replica.release.set()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    futures = [gatherer.submit(c) for c in ("a", "bad-b", "c")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == "answer to a" and results[2] == "answer to c"
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad bad-b"


async def test_a_failed_call_fails_each_of_its_requests_and_later_ones_still_go() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    first = [gatherer.submit(c) for c in "ab"]
    replica.fail_with = RuntimeError("replica died")
    replica.release.set()
    results = await asyncio.gather(*first, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "replica died" for r in results)
    replica.fail_with = None
    assert await gatherer.submit("c") == "answer to c"


async def test_a_request_given_up_while_waiting_is_not_sent() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    first, gone, kept = gatherer.submit("a"), gatherer.submit("b"), gatherer.submit("c")
    gone.cancel()  # its client hung up
    replica.release.set()
    assert await asyncio.gather(first, kept) == ["answer to a", "answer to c"]
    assert replica.groups == [["a"], ["c"]]


async def test_an_answer_to_a_request_given_up_in_flight_is_dropped() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    gone = gatherer.submit("a")
    await settle()
    gone.cancel()
    replica.release.set()
    assert await gatherer.submit("b") == "answer to b"
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_call_whose_requests_are_all_given_up_is_cancelled_and_frees_its_slot() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    alone = gatherer.submit("a")
    await settle()
    pair = [gatherer.submit("b"), gatherer.submit("c")]  # wait for the slot
    alone.cancel()  # its client hung up: the call goes, and the pair leaves at once
    await settle()
    assert replica.cancelled == [["a"]] and replica.groups == [["a"], ["b", "c"]]
    pair[0].cancel()  # one of two gone: the call stays
    await settle()
    assert replica.cancelled == [["a"]]
    replica.release.set()
    assert await pair[1] == "answer to c"


async def test_held_requests_leave_after_max_hold_even_with_every_call_out() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1, max_hold_s=0.02)
    futures = [gatherer.submit(c) for c in "abc"]
    await settle()
    assert replica.groups == [["a"]]
    await asyncio.sleep(0.05)  # "a" is still out, yet b and c do not wait for it
    assert replica.groups == [["a"], ["b", "c"]]
    replica.release.set()
    assert await asyncio.gather(*futures) == [f"answer to {c}" for c in "abc"]


async def test_group_settings_change_live() -> None:
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=8, max_in_flight=1)
    gatherer.max_group, gatherer.max_in_flight = 2, 3
    futures = [gatherer.submit(c) for c in "abcde"]
    await settle()
    assert replica.groups == [["a"], ["b"], ["c"]]
    replica.release.set()
    await asyncio.gather(*futures)
    assert replica.groups[3:] == [["d", "e"]]


async def test_past_its_capacity_a_request_is_refused_503_until_answers_free_room() -> None:
    # Serve's queue bound counts calls, each carrying many requests: the
    # requests held here and out are bounded here instead.
    replica = Replica()
    gatherer = Gatherer(replica.send, max_group=2, max_in_flight=1, capacity=3)
    futures = [gatherer.submit(c) for c in "abc"]
    with pytest.raises(OverloadedError) as refused:
        await gatherer.submit("d")
    assert refused.value.status_code == 503 and refused.value.headers()["retry-after"] == "1"
    futures[2].cancel()  # a client that leaves gives its room back
    await settle()
    futures.append(gatherer.submit("e"))
    replica.release.set()
    assert await asyncio.gather(*futures[:2], futures[3]) == ["answer to a", "answer to b", "answer to e"]
    assert await gatherer.submit("f") == "answer to f"


@pytest.mark.parametrize(("queued", "capacity"), [(-1, None), (6, 2 * 4 + 6)])
def test_a_models_queue_bound_makes_its_gathering_capacity(queued: int, capacity: int | None) -> None:
    model = ClassicalModelConfig.model_validate({
        "name": "iris", "engine": "sklearn", "model": "m",
        "num_replicas": 2, "max_ongoing_requests": 4, "max_queued_requests": queued,
    })
    gathering = Gathering.for_model(model)
    assert gathering is not None and gathering.capacity == capacity
