"""gateway/http/dispatch.py with a limited key: a request's reservation in the
key's ledger ends, once, however the request ends (answered, refused before its
first byte, given up before any replica was found, or served by a fallback)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from fastapi import FastAPI

from gateway.auth.keys import ApiKey
from gateway.auth.local import LocalLimiter
from gateway.auth.prompt_count import WordCounter
from gateway.errors import InvalidRequestError
from gateway.http import dispatch, limits
from gateway.http.limits import limits_of
from gateway.routing.table import Alias
from gateway.protocol.engine import Outcome, Reply
from gateway.routing.weighted import Variant
from models.llm.engine import EngineInfo
from models.llm.relay import StreamServer
from tests.unit.gateway.http.test_dispatch import (
    COUNTED_TOKENS,
    PREDICT,
    FakeHandle,
    FakeReplica,
    Restarting,
    make_app,
)
from tests.unit.gateway.http.test_dispatch_hang_ups import SCOPE
from tests.unit.gateway.http.test_relay_connection import until

KEY = ApiKey("team", ("*",), tpm=10_000, max_concurrent=1)
# (Without a token limit: a request is reserved before any replica counts its tokens.)
ONE_PLACE = ApiKey("team", ("*",), max_concurrent=1)


def ledger_of(app: FastAPI) -> Any:
    limiter: LocalLimiter = app.state.dispatcher.limiter
    return limiter.ledger


async def request(
    app: FastAPI, path: str, body: dict[str, Any], leave_after_s: float | None = None, key: ApiKey = KEY,
    sent: list[dict[str, Any]] | None = None,
) -> int:
    """``body`` sent to ``path`` with ``key`` (its client leaving after
    ``leave_after_s``, if given); the response's status (its ASGI messages
    go to ``sent``, when given)."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent = sent if sent is not None else []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if leave_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(leave_after_s)  # (the client hangs up this long after sending)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**SCOPE, "path": path, "raw_path": path.encode(), "state": {"api_key": key}}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return int(sent[0]["status"])


async def never_counts(replica: FakeReplica, call: Any) -> int:
    """A model replica's count that never answers (a stuck replica)."""
    await asyncio.Event().wait()
    raise AssertionError


def no_replica() -> Restarting:
    """An LLM whose replica is down: Serve's router finds none."""
    handle = Restarting()
    handle.up.clear()
    return handle


async def test_a_whole_answer_whose_client_leaves_before_a_replica_is_found_ends_its_reservation() -> None:
    app = make_app(no_replica())
    assert await request(app, "/chat", {"model": "m"}, leave_after_s=0.05, key=ONE_PLACE) == 499
    await until(lambda: ledger_of(app).in_flight(ONE_PLACE.id) == 0)


async def test_a_whole_answer_out_of_time_before_a_replica_is_found_frees_its_keys_place() -> None:
    app = make_app(no_replica(), timeouts={"m": 0.1})
    assert await request(app, "/chat", {"model": "m"}, key=ONE_PLACE) == 504
    await until(lambda: ledger_of(app).in_flight(ONE_PLACE.id) == 0)  # else the key is shut out for good


@pytest.mark.parametrize("ends", ["timeout", "client-left"])
async def test_a_stream_given_up_before_a_replica_is_found_counts_no_tokens(ends: str) -> None:
    # The model's tokenizer was learnt from an earlier replica: the ingress counts the prompt itself.
    app = make_app(no_replica(), timeouts={"m": 0.2})
    client = app.state.dispatcher._table.model("m").client
    client.counter, client.window = WordCounter(), 1_000
    leave = 0.05 if ends == "client-left" else None
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}], "max_tokens": 5}
    assert await request(app, "/chat", body, leave_after_s=leave) == (
        499 if leave else 504
    )
    await until(lambda: ledger_of(app).in_flight(KEY.id) == 0)
    assert ledger_of(app).usage(KEY.id, limits_of(KEY)).remaining_tokens == KEY.tpm  # nothing reached a replica


@pytest.mark.parametrize("bound", [None, "max_tokens", "max_completion_tokens"])
async def test_a_chat_too_large_for_good_says_when_its_missing_bound_is_why(bound: str | None) -> None:
    # Without an output bound a chat reserves the rest of the window: a key
    # whose tpm is under it was refused for good, the message not saying why.
    app = make_app(FakeHandle())
    client = app.state.dispatcher._table.model("m").client
    client.counter, client.window = WordCounter(), 1_000
    key = ApiKey("team", ("*",), tpm=500)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "a b"}]}
    if bound is not None:
        body[bound] = 600
    sent: list[dict[str, Any]] = []
    assert await request(app, "/chat", body, key=key, sent=sent) == 429
    message = json.loads(sent[1]["body"])["error"]["message"]
    assert message.startswith("Request too large for m on API key team on tokens per min (TPM): Limit 500")
    assert ("set `max_completion_tokens` to bound its output" in message) == (bound is None)


async def test_a_stream_refused_before_its_first_byte_counts_no_tokens() -> None:
    app = make_app(FakeHandle(stream=[InvalidRequestError("bad field", param="x")]))
    assert await request(app, "/chat", {"model": "m", "stream": True}) == 400
    assert ledger_of(app).in_flight(KEY.id) == 0
    assert ledger_of(app).usage(KEY.id, limits_of(KEY)).remaining_tokens == KEY.tpm  # not the COUNTED_TOKENS reserved


async def test_an_answered_request_counts_what_it_used() -> None:
    app = make_app(FakeHandle())
    assert await request(app, "/chat", {"model": "m"}) == 200
    assert ledger_of(app).in_flight(KEY.id) == 0
    used = KEY.tpm - ledger_of(app).usage(KEY.id, limits_of(KEY)).remaining_tokens
    assert 0 <= used < COUNTED_TOKENS  # settled to what the model reported, not the reservation


async def test_a_classical_fallback_runs_under_the_requests_reservation() -> None:
    down, second = Restarting(), FakeHandle(unary=b'{"predictions": [2]}', delay=0.5)
    alias = Alias([Variant("a", 100), Variant("b", 1)], fallback=True)
    kinds = {"a": "classifier", "b": "classifier"}
    app = make_app(handles={"a": down, "b": second}, alias=alias, kinds=kinds, replica_wait_s=0.3)
    assert await request(app, "/predict/a", PREDICT) == 200  # running: known to the ingress
    down.up.clear()  # its replica dies; Serve's router holds the next call for a new one
    down.delay = 30
    answered = asyncio.ensure_future(request(app, "/predict/r", PREDICT))
    await until(lambda: bool(second.calls))
    assert ledger_of(app).in_flight(KEY.id) == 1  # the key's one place is the fallback's
    assert await answered == 200
    assert ledger_of(app).in_flight(KEY.id) == 0



async def test_a_classical_request_cancelled_while_its_model_has_no_replica_ends_its_reservation() -> None:
    # Serve's proxy cancels the request's task when its client hangs up.
    app = make_app(no_replica(), kinds={"m": "classifier"}, replica_wait_s=30)
    serving = asyncio.ensure_future(request(app, "/predict/m", PREDICT, key=ONE_PLACE))
    await until(lambda: ledger_of(app).in_flight(ONE_PLACE.id) == 1)  # admitted; waiting for a replica
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    assert ledger_of(app).in_flight(ONE_PLACE.id) == 0


async def test_a_variant_down_when_its_tokens_are_counted_falls_back_to_the_next() -> None:
    # Its tokenizer not learnt, the model's replica counts a limited key's
    # reservation: with none running, the request was a 503 before its
    # route's fallback could serve it.
    alias = Alias([Variant("a", 100), Variant("b", 1)], fallback=True)
    app = make_app(handles={"a": no_replica(), "b": FakeHandle()}, alias=alias, replica_wait_s=0.2)
    assert await request(app, "/chat", {"model": "r"}) == 200
    assert ledger_of(app).in_flight(KEY.id) == 0


async def test_a_request_refused_by_its_keys_limit_after_routing_names_its_variant() -> None:
    app = make_app(handles={"a": FakeHandle(unary=b"{}"), "b": FakeHandle(unary=b"{}")},
                   alias=Alias([Variant("a", 0), Variant("b", 1)]))
    key = ApiKey("team", ("*",), rpm=1)
    answers = []
    for _ in range(2):
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": json.dumps({"model": "r"}).encode(), "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else await asyncio.Future()  # type: ignore[no-any-return]

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {**SCOPE, "path": "/chat", "raw_path": b"/chat", "state": {"api_key": key}}
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
        answers.append((sent[0]["status"], dict(sent[0]["headers"]).get(b"x-gateway-variant")))
    assert answers == [(200, b"b"), (429, b"b")]
    # The A/B split counts the request it served, not the one refused.
    assert app.state.metrics.snapshot()["llm_gateway_ab_assignments_total"] == {("r", "b"): 1}


async def test_a_key_over_its_request_limit_is_refused_before_its_tokens_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted: list[Any] = []
    count = FakeReplica.count

    async def counting(replica: FakeReplica, call: Any) -> int:
        counted.append(call)
        return await count(replica, call)

    monkeypatch.setattr(FakeReplica, "count", counting)
    app = make_app(FakeHandle())
    key = ApiKey("team", ("*",), rpm=1, tpm=10_000)
    assert [await request(app, "/chat", {"model": "m"}, key=key) for _ in range(3)] == [200, 429, 429]
    # Only the first was counted (by the model's replica): the others, refused whatever
    # they asked, cost no count (this gateway's ledger is in its ingress: asked each time).
    assert len(counted) == 1


@pytest.mark.parametrize(("inputs", "off_loop"), [(3, False), (20_000, True)])
async def test_a_long_embedding_input_is_bounded_off_the_loop(
    monkeypatch: pytest.MonkeyPatch, inputs: int, off_loop: bool
) -> None:
    # Walking millions of inputs takes a second: every request of the ingress would wait for it.
    walked_in: list[bool] = []

    def bound(endpoint: str, body: dict[str, Any], window: int | None) -> int:
        walked_in.append(threading.current_thread() is not threading.main_thread())
        return limits.embedding_tokens(endpoint, body, window)

    monkeypatch.setattr(dispatch, "embedding_tokens", bound)
    app = make_app(FakeHandle(unary=b'{"predictions": []}'), kinds={"m": "embedding"})
    body = {"instances": ["some words"] * inputs}
    assert await request(app, "/predict/m", body, key=ApiKey("team", ("*",), tpm=10_000_000)) == 200
    assert walked_in == [off_loop]


@pytest.mark.parametrize("learnt", [True, False])
async def test_an_embedding_input_is_reserved_no_more_than_the_models_window(learnt: bool) -> None:
    # 3,000 bytes of text reserved 3,002 tokens: a key allowed 1,000 a minute was
    # refused "request too large" for good, although the model takes at most 256.
    handle = FakeHandle(unary=Reply(b'{"data": []}', Outcome(prompt_tokens=200)))
    handle.info = EngineInfo(root=None, max_model_len=256)
    app = make_app(handle, kinds={"m": "embedding"})
    if learnt:  # (as an ingress replica does before it takes clients)
        await app.state.dispatcher.table.models["m"].client.warm()
        handle.info = None  # (no longer answered: what counts is what warm learnt)
    key = ApiKey("team", ("*",), tpm=1_000)
    assert await request(app, "/predict/m", {"instances": ["x" * 3_000]}, key=key) == 200
    assert await request(app, "/predict/m", {"instances": ["x" * 3_000] * 3}, key=key) == 200
    assert len(handle.calls) == 2
    # Beyond the window a key's limit still refuses what it can never hold.
    assert await request(app, "/predict/m", {"instances": ["x" * 3_000] * 5}, key=key) == 429


async def test_an_embedding_model_that_cannot_say_its_window_is_reserved_its_inputs_bytes() -> None:
    handle = FakeHandle(unary=Reply(b'{"data": []}', Outcome(prompt_tokens=200)))
    handle.info = RuntimeError("replica gone")  # (the window stays unknown; asked again next time)
    app = make_app(handle, kinds={"m": "embedding"})
    key = ApiKey("team", ("*",), tpm=1_000)
    assert await request(app, "/predict/m", {"instances": ["x" * 900]}, key=key) == 200
    assert await request(app, "/predict/m", {"instances": ["x" * 3_000]}, key=key) == 429
    handle.info = EngineInfo(root=None, max_model_len=256)
    assert await request(app, "/predict/m", {"instances": ["x" * 3_000]}, key=key) == 200


async def test_a_count_the_replica_does_not_answer_is_bounded_by_the_models_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A count is part of the request: a replica that never answers it held the
    # request (and the client) for ever, past the model's request_timeout_s.
    monkeypatch.setattr(FakeReplica, "count", never_counts)
    app = make_app(FakeHandle(), timeouts={"m": 0.2})
    assert await request(app, "/chat", {"model": "m"}) == 504
    assert ledger_of(app).in_flight(KEY.id) == 0  # nothing was reserved


async def test_a_count_stopped_with_its_ingress_replica_is_not_tried_on_the_next_variant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted: list[str] = []
    most_tokens = dispatch.ModelDispatcher._most_tokens

    async def counting(self: Any, model: Any, call: Any, size: int) -> int:
        counted.append(model.name)
        return await most_tokens(self, model, call, size)

    monkeypatch.setattr(FakeReplica, "count", never_counts)
    monkeypatch.setattr(dispatch.ModelDispatcher, "_most_tokens", counting)
    alias = Alias([Variant("a", 100), Variant("b", 1)], fallback=True)
    app = make_app(handles={"a": FakeHandle(), "b": FakeHandle()}, alias=alias)
    app.state.dispatcher.stopping.begin(0.4)
    assert await request(app, "/chat", {"model": "r"}) == 503
    assert counted == ["a"]  # the time is spent: the next variant's count would be stopped at once too


async def test_a_count_that_fails_on_the_fallback_variant_names_that_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first variant has no replica: the fallback's replica counts, and its limit runs out.
    monkeypatch.setattr(FakeReplica, "count", never_counts)
    alias = Alias([Variant("a", 100), Variant("b", 1)], fallback=True)
    app = make_app(handles={"a": no_replica(), "b": FakeHandle()}, alias=alias, replica_wait_s=0.1, timeouts={"b": 0.2})
    messages = [{"type": "http.request", "body": json.dumps({"model": "r"}).encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**SCOPE, "path": "/chat", "raw_path": b"/chat", "state": {"api_key": KEY}}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert sent[0]["status"] == 504
    assert dict(sent[0]["headers"])[b"x-gateway-variant"] == b"b"


async def test_a_classical_request_waiting_for_a_replica_is_stopped_with_its_ingress_replica() -> None:
    # A classical model's wait for a replica (up to replica_wait_s) was outside
    # the stop's bound: the server's cut answered it a plain-text 500.
    app = make_app(no_replica(), kinds={"m": "classifier"}, replica_wait_s=30)
    app.state.dispatcher.stopping.begin(0.4)
    started = asyncio.get_running_loop().time()
    assert await request(app, "/predict/m", PREDICT, key=ONE_PLACE) == 503
    assert asyncio.get_running_loop().time() - started < 2  # at the stop, not after the replica wait
    assert ledger_of(app).in_flight(ONE_PLACE.id) == 0  # its key's place is free


async def test_a_key_counts_no_more_requests_at_once_than_its_places(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted before admission (which checks its places), a key with one place sending many requests
    # at once kept as many renders running on the model's replica, each then refused 429.
    counting, peak, release = [0], [0], asyncio.Event()
    count = FakeReplica.count

    async def held(replica: FakeReplica, call: Any) -> int:
        counting[0] += 1
        peak[0] = max(peak[0], counting[0])
        await release.wait()
        counting[0] -= 1
        return await count(replica, call)

    monkeypatch.setattr(FakeReplica, "count", held)
    app = make_app(FakeHandle())
    answers: list[list[dict[str, Any]]] = [[] for _ in range(6)]
    sent = [asyncio.ensure_future(request(app, "/chat", {"model": "m"}, sent=answers[i])) for i in range(6)]
    # One counts, one waits for it (a moment, as for a place); the others are refused at once.
    await until(lambda: sum(task.done() for task in sent) >= 4 and counting[0] == 1)
    release.set()
    statuses = await asyncio.gather(*sent)
    assert peak[0] == 1
    assert statuses[0] == 200 and statuses.count(429) >= 4
    refusal = json.loads(next(m["body"] for m in answers[-1] if m["type"] == "http.response.body"))
    assert "on concurrent requests: Limit 1" in refusal["error"]["message"]
    # A key without a place limit is not held back.
    release.clear()
    unplaced = ApiKey("open", ("*",), tpm=10_000)
    sent = [asyncio.ensure_future(request(app, "/chat", {"model": "m"}, key=unplaced)) for _ in range(3)]
    await until(lambda: counting[0] == 3)
    release.set()
    assert await asyncio.gather(*sent) == [200] * 3


async def test_a_stream_left_in_its_replicas_queue_counts_no_tokens() -> None:
    # Clients that give up while the model is busy are not charged what they might have used.
    handle = FakeHandle(delay=60)
    replica = handle.replica
    replica.server = StreamServer(
        replica.open_stream, "127.0.0.1", max_ongoing=1, answer=replica.answer, count=replica.count
    )
    app = make_app(handle)
    busy = asyncio.ensure_future(request(app, "/chat", {"model": "m"}, key=ApiKey("other", ("*",))))
    await until(lambda: len(handle.calls) == 1)  # it holds the replica's one place
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}], "max_tokens": 5}
    assert await request(app, "/chat", body, leave_after_s=0.3) == 499
    await until(lambda: ledger_of(app).in_flight(KEY.id) == 0)
    await until(lambda: ledger_of(app).usage(KEY.id, limits_of(KEY)).remaining_tokens == KEY.tpm)
    assert [call.body.get("stream") for call in handle.calls if call is not None] == [None]  # it never ran
    busy.cancel()
