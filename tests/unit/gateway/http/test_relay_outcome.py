"""gateway/http/relay_outcome.py: an answer's outcome is known even when
its caller stops waiting halfway through the outcome's line (a deadline, a
client that leaves), over a real connection to a replica that sends the
line in two parts."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway import sse
from gateway.errors import ServiceUnavailableError
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_stream import RelayedStream
from gateway.metrics.recorder import RequestRecord
from gateway.protocol import port_proof, relay
from gateway.protocol.engine import EngineRequest, Outcome
from tests.unit.gateway.http.test_relay import CALL, OUTCOME, Router
from tests.unit.gateway.http.test_handoff import ClientSocketSink
from tests.unit.gateway.http.test_relay_connection import until
from tests.unit.gateway.http.test_relay_segments import Passing, Proxy, passed_as_is
from tests.unit.gateway.http.test_relay_response import (
    Written,
    _unchunk,
    fake_replica,
    frames_server,
    outcome_late,
    uvicorn_serving,
)
from tests.unit.models.llm.test_handoff import client_pair, readable_eof


async def split_outcome_replica(answer: bytes) -> tuple[relay.RelayAddress, Any]:
    """A replica that writes ``answer`` (its head and body), ``END`` and the
    first half of its outcome's line, and the other half only once its
    caller has stopped waiting (``relay.LEFT``); then it closes."""
    line = relay.encode_outcome(OUTCOME)
    half = len(line) // 2

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, "t", 5)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(relay.parse_head(head).content_length())
        writer.write(answer + relay.END + line[:half])
        await writer.drain()
        assert await reader.read(1) == relay.LEFT
        writer.write(line[half:])
        await writer.drain()
        await reader.read()  # the caller's end
        writer.close()

    server = await asyncio.start_server(replica, "127.0.0.1", 0)
    return relay.RelayAddress("127.0.0.1", server.sockets[0].getsockname()[1], "t"), server


async def cut_outcome_replica(answer: bytes) -> tuple[relay.RelayAddress, Any]:
    """A replica that writes ``answer`` (its head and body), ``END`` and half
    its outcome's line, and then stops."""
    line = relay.encode_outcome(OUTCOME)

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, "t", 5)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(relay.parse_head(head).content_length())
        writer.write(answer + relay.END + line[: len(line) // 2])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(replica, "127.0.0.1", 0)
    return relay.RelayAddress("127.0.0.1", server.sockets[0].getsockname()[1], "t"), server


def holding() -> tuple[Passing, Passing]:
    """The two ways of a proxy in front of a real replica: of what follows the
    replica's ``END`` it passes on half the outcome's line, and the rest
    only once the ingress has stopped waiting (``relay.LEFT`` and the end of
    its side)."""
    stopped = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await passed_as_is(reader, writer)
        finally:
            stopped.set()  # it half-closed its side (``abandon``), or went

    async def passing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held, hold = b"", True
        while data := await reader.read(65536):
            if hold and (held or relay.END in data):
                held += data
                end = held.find(relay.END)
                if (newline := held.find(b"\n", end)) < 0:
                    continue
                cut = end + 1 + (newline - end) // 2
                writer.write(held[:cut])
                await stopped.wait()
                data, hold = held[cut:], False
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    return passing, upstream


async def stopped_at(condition: Callable[[], bool], piping: asyncio.Future[bool]) -> None:
    """Cancels ``piping`` (as a model's ``request_timeout_s`` does) once ``condition`` holds."""
    await until(condition)
    assert not piping.done()
    piping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await piping


@pytest.mark.parametrize("immediate", [True, False], ids=["forwarded", "sent"])
async def test_a_stream_stopped_inside_its_outcome_line_still_reports_its_outcome(immediate: bool) -> None:
    frame = sse.frame({"n": 0}) + sse.DONE
    address, server = await split_outcome_replica(relay.response_head(200, sse.MEDIA_TYPE) + frame)
    stream = await ReplicaRelay(Router(address)).open(CALL)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    stream.when_ended(reported.set_result)
    sink = Written()
    sink.immediate = immediate
    # Stopped once every byte up to END has been passed on, and half the outcome's line read.
    await stopped_at(lambda: stream.delivered, asyncio.ensure_future(stream.pipe(sink)))
    assert b"".join(sink.data) == frame
    assert await asyncio.wait_for(reported, 2) == OUTCOME
    await asyncio.wait_for(stream.released(), 2)
    assert stream.outcome == OUTCOME and stream.delivered
    server.close()


async def test_a_whole_answer_abandoned_inside_its_outcome_line_still_reports_its_outcome() -> None:
    body = b'{"choices":[]}'
    address, server = await split_outcome_replica(relay.response_head(200, "application/json") + body)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(
        ReplicaRelay(Router(address)).call(EngineRequest("chat", {"model": "m"}, "r", "m"), reported.set_result)
    )
    done, _ = await asyncio.wait({call}, timeout=0.2)  # waiting for the rest of the outcome's line
    assert not done
    call.cancel()
    assert await asyncio.wait_for(reported, 2) == OUTCOME
    server.close()


async def test_a_handed_over_stream_stopped_inside_its_outcome_line_still_reports_its_whole_answer() -> None:
    frames = [sse.frame({"n": i}) for i in range(3)] + [sse.DONE]
    proxy = Proxy(await frames_server(frames).start(), *holding())
    address = await proxy.start()
    stream = await ReplicaRelay(Router(address)).open(CALL)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    stream.when_ended(reported.set_result)
    with client_pair() as (ours, theirs):
        # Stopped once the replica has ended the body, its outcome's line half read.
        await stopped_at(lambda: stream.body_ended, asyncio.ensure_future(stream.pipe(ClientSocketSink(ours))))
        assert stream.handed_off
        assert await asyncio.wait_for(reported, 2) == dataclasses.replace(OUTCOME, body_ended=True)
        await asyncio.wait_for(stream.released(), 2)
        assert stream.outcome == dataclasses.replace(OUTCOME, body_ended=True)
        ours.close()
        assert (await readable_eof(theirs)).endswith(sse.DONE + b"\r\n0\r\n\r\n")
    proxy.close()


async def test_a_deadline_inside_a_relayed_streams_outcome_line_writes_no_error_after_its_last_frame() -> None:
    frames = [sse.frame({"n": i}) for i in range(3)] + [sse.DONE]
    proxy = Proxy(await frames_server(frames, handoff=False).start(), *holding())
    address = await proxy.start()
    opened: list[RelayedStream] = []
    records: list[RequestRecord] = []
    # The deadline comes after the last frame (within milliseconds), inside the outcome's line (held back).
    async with uvicorn_serving(ReplicaRelay(Router(address)), opened, records, timeout_s=0.5) as url:
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nhost: t\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 5)
        await until(lambda: records[0].outcome is not None)
        writer.close()
    assert _unchunk(answer.partition(b"\r\n\r\n")[2]) == b"".join(frames)  # no error frame after [DONE]
    assert not opened[0].handed_off and records[0].outcome == OUTCOME
    assert (records[0].error, records[0].late_status) == (None, None)
    proxy.close()


async def test_a_stream_whose_replica_stops_inside_its_outcome_line_ends_whole_for_its_client() -> None:
    """Its last frame was sent: the client gets the body's end, not an error
    frame after ``[DONE]``; how it ended is not known, so it is not counted."""
    frames = [sse.frame({"n": i}) for i in range(3)] + [sse.DONE]
    address, server = await cut_outcome_replica(relay.response_head(200, sse.MEDIA_TYPE) + b"".join(frames))
    opened: list[RelayedStream] = []
    records: list[RequestRecord] = []
    async with uvicorn_serving(ReplicaRelay(Router(address)), opened, records) as url:
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
    assert response.content == b"".join(frames) and opened[0].delivered
    assert records[0].outcome is None and (records[0].error, records[0].late_status) == (None, None)
    server.close()


async def test_a_whole_answer_whose_replica_stops_inside_its_outcome_line_is_a_503() -> None:
    address, server = await cut_outcome_replica(relay.response_head(200, "application/json") + b'{"choices":[]}')
    with pytest.raises(ServiceUnavailableError):
        await ReplicaRelay(Router(address)).call(EngineRequest("chat", {"model": "m"}, "r", "m"))
    server.close()


@pytest.mark.parametrize("immediate", [True, False], ids=["forwarded", "iterated"])
async def test_a_client_gone_as_the_last_frame_arrives_with_the_outcome_still_gets_it_counted(immediate: bool) -> None:
    # The stream's last frame, END and the outcome in one read, and no client to write the frame to.
    body = sse.frame({"n": 0}) + sse.DONE
    answer = relay.response_head(200, sse.MEDIA_TYPE, keep=False) + body + relay.END + relay.encode_outcome(OUTCOME)
    async with fake_replica(answer) as address:
        stream = await ReplicaRelay(Router(address)).open(CALL)
        await until(lambda: relay.END in bytes(stream._reader._buffer))  # type: ignore[attr-defined]
        reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        stream.when_ended(reported.set_result)
        if immediate:
            assert await stream.pipe(Written(room=0)) is False  # the client had left
        else:
            chunks = stream.chunks()
            assert await anext(chunks) == body
            await chunks.aclose()  # the client leaves as it is handed the last frame
        assert await asyncio.wait_for(reported, 2) == OUTCOME  # its key is charged what it used
    assert not stream.delivered


async def leaving_at(
    server: Any, last: bytes
) -> tuple[bytes, list[RelayedStream], list[RequestRecord], list[bool]]:
    """A client of a real uvicorn relaying ``server``'s stream that reads up to
    the chunk ending in ``last`` and hangs up: what it read, the stream, its
    record and whether its response was completed."""
    opened: list[RelayedStream] = []
    records: list[RequestRecord] = []
    completed: list[bool] = []
    async with uvicorn_serving(ReplicaRelay(Router(await server.start())), opened, records, completed=completed) as url:
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nhost: t\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(last + b"\r\n"), 5)
        writer.close()
        await until(lambda: bool(completed))
        await asyncio.wait_for(opened[0].released(), 2)
    return answer, opened, records, completed


async def test_a_client_that_leaves_after_the_last_frame_of_a_relayed_stream_was_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replica sends its end mark a moment after the stream's last frame;
    a client that reads that frame and leaves at once had the whole answer:
    counted as answered, not as a hang-up."""
    outcome_late(monkeypatch, 0.3)
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    answer, opened, records, completed = await leaving_at(frames_server(frames, handoff=False), sse.DONE)
    assert _unchunk(answer.partition(b"\r\n\r\n")[2] + b"0\r\n\r\n") == b"".join(frames)
    assert not opened[0].handed_off and opened[0].delivered
    assert (records[0].outcome, records[0].error, records[0].late_status) == (OUTCOME, None, None)
    assert completed == [True]  # logged and counted as answered (200), not as a hang-up (499)


async def test_a_client_that_leaves_before_the_last_frame_of_a_relayed_stream_left() -> None:
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    aborted = asyncio.Event()
    server = frames_server(frames, gap_s=0.2, aborted=aborted, handoff=False)
    _, opened, records, completed = await leaving_at(server, frames[-2])  # all but [DONE]
    assert aborted.is_set()
    assert not opened[0].delivered and opened[0].outcome is None and records[0].outcome is None
    assert completed == [False]  # a hang-up (499)


def holding_the_rest(first: bytes) -> tuple[Passing, Passing]:
    """The two ways of a proxy in front of a replica: it passes on the
    replica's bytes up to the end of ``first``, and the rest (the stream's
    last frames, its end mark and outcome, all written already) only once
    the ingress has stopped waiting."""
    stopped = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await passed_as_is(reader, writer)
        finally:
            stopped.set()

    async def passing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while first not in (held := await reader.read(65536)):  # the port's proof, before the stream
            assert held
            writer.write(held)
        cut = held.index(first) + len(first)
        writer.write(held[:cut])
        while relay.END not in held or not held.endswith(b"\n"):
            assert (data := await reader.read(65536))
            held += data
        await stopped.wait()
        writer.write(held[cut:])
        await writer.drain()
        await passed_as_is(reader, writer)

    return passing, upstream


@pytest.mark.parametrize("immediate", [True, False], ids=["forwarded", "sent"])
async def test_a_stream_left_with_its_last_frames_unread_was_not_answered_whole(immediate: bool) -> None:
    """The replica had written every frame, but the client left before the
    last of them reached the ingress: it did not have the whole answer."""
    frames = [sse.frame({"n": i}) for i in range(3)] + [sse.DONE]
    proxy = Proxy(await frames_server(frames, handoff=False).start(), *holding_the_rest(frames[0]))
    address = await proxy.start()
    stream = await ReplicaRelay(Router(address)).open(CALL)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    stream.when_ended(reported.set_result)
    sink = Written()
    sink.immediate = immediate
    await stopped_at(lambda: b"".join(sink.data) == frames[0], asyncio.ensure_future(stream.pipe(sink)))
    # Charged what it generated, all of it; not answered.
    assert await asyncio.wait_for(reported, 2) == dataclasses.replace(OUTCOME, stopped=True)
    await asyncio.wait_for(stream.released(), 2)
    assert stream.outcome is None and not stream.delivered
    proxy.close()


@pytest.mark.parametrize("immediate", [True, False], ids=["forwarded", "sent"])
async def test_a_relayed_stream_left_mid_way_waits_only_a_moment_for_a_replica_that_says_nothing(
    immediate: bool,
) -> None:
    """A wedged replica (often why a deadline passes) never says how the
    stream ended: the ingress takes it for a hang-up, or sends its error
    frame, within ``RELAYED_WORD_S``, not the outcome's whole wait."""
    from gateway.http import relay_stream

    done = asyncio.Event()

    async def wedged(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, "t", 5)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(relay.response_head(200, sse.MEDIA_TYPE) + sse.frame({"n": 0}))
        await done.wait()  # it reads and says nothing more
        writer.close()

    server = await asyncio.start_server(wedged, "127.0.0.1", 0)
    address = relay.RelayAddress("127.0.0.1", server.sockets[0].getsockname()[1], "t")
    stream = await ReplicaRelay(Router(address)).open(CALL)
    sink = Written()
    sink.immediate = immediate
    await stopped_at(lambda: bool(sink.data), asyncio.ensure_future(stream.pipe(sink)))
    started = asyncio.get_running_loop().time()
    await stream.released()
    waited = asyncio.get_running_loop().time() - started
    done.set()
    server.close()
    assert relay_stream.RELAYED_WORD_S * 0.9 <= waited < relay_stream.RELAYED_WORD_S * 2
    assert not stream.delivered and stream.outcome is None


async def test_a_relayed_stream_left_while_its_client_was_behind_was_not_answered_whole() -> None:
    """Reading paused while the client took what was written: what it had
    not taken when it left is lost, though the ingress wrote it."""
    frames = [sse.frame({"n": i}) for i in range(3)] + [sse.DONE]
    proxy = Proxy(await frames_server(frames, handoff=False).start(), *holding_the_rest(frames[-1]))
    stream = await ReplicaRelay(Router(await proxy.start())).open(CALL)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    stream.when_ended(reported.set_result)
    sink = Written()
    sink.congested = lambda: True  # type: ignore[method-assign]  # every write fills the client's window

    async def never() -> None:
        await asyncio.Event().wait()

    sink.drain = never  # type: ignore[method-assign]  # and it takes nothing more
    await stopped_at(lambda: b"".join(sink.data).endswith(sse.DONE), asyncio.ensure_future(stream.pipe(sink)))
    assert await asyncio.wait_for(reported, 2) == OUTCOME  # the replica wrote it all
    await asyncio.wait_for(stream.released(), 2)
    assert not stream.delivered and stream.outcome is None
    proxy.close()
