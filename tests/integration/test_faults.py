"""A vLLM engine (or a classical replica) that dies: fast honest answers, fallback, and a new replica.

The engine-core process of the real vLLM replica is killed mid-stream. The
streams end with an error frame (a Messages API stream with Anthropic's
``error`` event); from then until a new replica serves, each
request to the model is answered 503 ``service_unavailable`` with
``Retry-After`` (at most ``ingress.replica_wait_s``, 2 s in the test config,
and mostly at once), never 500 and never a hang; a route with ``fallback``
answers from its next variant; ``/ready`` says the gateway is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator

import httpx
import psutil

from tests.integration.conftest import APP, INGRESS_REPLICAS, VLLM_MODEL, Gateway
from tests.integration.test_messages import access_line
from tests.integration.test_routing import replica_process

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
REPLICA_WAIT_S = 2
RECOVERY_LIMIT_S = 240  # a new vLLM replica on a loaded 2-core CI machine


def engine_core(replica_pid: int) -> psutil.Process | None:
    """vLLM's engine-core process under the model's replica, if it has one yet.

    vLLM titles it ``VLLM::EngineCore``: matched on the command line, or on
    the process name, which is cut at 15 characters. Some CI runs showed the
    replica's processes untitled (``python -B -c from multiprocessing.spawn
    import spawn_main...``, the model answering all along): the engine core is
    then the replica's one direct child that multiprocessing spawned (its
    worker is that child's own child; the resource tracker is no spawn).
    """
    spawned = []
    for child in psutil.Process(replica_pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if "EngineCore" in command or child.name().startswith("VLLM::EngineCor"):
                return child
            if child.ppid() == replica_pid and "multiprocessing.spawn import spawn_main" in command:
                spawned.append(child)
        except psutil.NoSuchProcess:
            continue
    return spawned[0] if len(spawned) == 1 else None


def _described(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()!r} {' '.join(process.cmdline())[:120]!r}"
    except psutil.Error as error:
        return f"{process.pid} ({type(error).__name__})"


async def serving_engine_core(session: httpx.AsyncClient) -> tuple[int, psutil.Process]:
    """The model's replica and its engine core, once the model answers.

    A replica that Serve (re)started a moment ago is listed before its engine
    has started: the model answering a request is what says it is up.
    """
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    while True:
        response = await session.post(CHAT, json={"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 1})
        replica_pid, started = replica_process(VLLM_MODEL)
        core = engine_core(replica_pid)
        if response.status_code == 200 and core is not None:
            return replica_pid, core
        children = [_described(c) for c in psutil.Process(replica_pid).children(recursive=True)]
        assert time.monotonic() < deadline, (
            f"no engine-core process under replica {replica_pid} (started {time.time() - started:.0f} s ago, "
            f"answer {response.status_code}): children {children}"
        )
        await asyncio.sleep(0.5)


async def test_a_dead_engine_is_answered_503_at_once_falls_back_and_is_replaced(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        replica_pid, core = await serving_engine_core(session)
        # Sticky users whose cohort picks the vLLM variant of `vllm-fb`.
        before = await session.post(CHAT, json={"model": "vllm-fb", "messages": HELLO, "max_tokens": 2, "user": "u1"})
        assert before.status_code == 200 and before.headers["x-gateway-variant"] == VLLM_MODEL

        body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 400, "stream": True, "ignore_eos": True}
        # A Messages API stream beside it (greedy, the tiny model writes to max_tokens).
        anthropic = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 400, "stream": True, "temperature": 0}
        async with session.stream("POST", CHAT, json=body) as stream, \
                session.stream("POST", "/v1/messages", json=anthropic) as messages:
            assert stream.status_code == 200 and messages.status_code == 200
            request_id, messages_id = stream.headers["x-request-id"], messages.headers["x-request-id"]
            lines, events = stream.aiter_lines(), messages.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
            while (await anext(events)) != "event: content_block_delta":
                pass
            os.kill(core.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            rest = [line async for line in lines if line.startswith("data: ")]
            events_left = [line async for line in events if line]
        assert rest[-1] == "data: [DONE]"
        frame = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert (frame["type"], frame["code"]) == ("service_unavailable", "service_unavailable")  # retry shortly
        # Anthropic's error event, its type for "retry shortly" (not vLLM's words about its own types).
        assert events_left[-2] == "event: error" and "event: message_stop" not in events_left
        error = json.loads(events_left[-1].removeprefix("data: "))
        assert (error["type"], error["error"]["type"]) == ("error", "overloaded_error")
        assert "retry" in error["error"]["message"]
        # The access log (and the request counters) say how the streams ended, not 200.
        # (Anthropic's route logs its status for overloaded_error, 529, as it answers one before a stream.)
        for stream_id, status in ((request_id, 503), (messages_id, 529)):
            line = await asyncio.to_thread(access_line, stream_id)
            assert (line["status"], line["error"]) == (status, "service_unavailable")

        waits: list[float] = []
        fallback_variants: set[str] = set()
        ready_statuses: set[int] = set()
        while True:
            assert time.monotonic() - killed_at < RECOVERY_LIMIT_S, "the model did not come back"
            started = time.monotonic()
            response = await session.post(CHAT, json={"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 2})
            took = time.monotonic() - started
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "service_unavailable"
            assert int(response.headers["retry-after"]) >= 1
            assert took < REPLICA_WAIT_S + 1.5
            waits.append(took)
            routed = await session.post(
                CHAT, json={"model": "vllm-fb", "messages": HELLO, "max_tokens": 2, "user": "u1"}
            )
            assert routed.status_code == 200, routed.text  # the next variant answers
            fallback_variants.add(routed.headers["x-gateway-variant"])
            ready_statuses.add((await session.get("/ready")).status_code)
            await asyncio.sleep(0.2)
        recovered_s = time.monotonic() - killed_at

    assert len(waits) >= 5 and statistics.median(waits) < 0.5, waits
    assert "echo" in fallback_variants
    assert 503 in ready_statuses
    new_pid, _ = replica_process(VLLM_MODEL)
    assert new_pid != replica_pid, "Serve started a new replica"
    print(f"model answered again {recovered_s:.1f} s after its engine died; 503 waits p50 "
          f"{statistics.median(waits) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms")


async def test_a_classical_replica_that_dies_is_answered_503_or_served_never_500_or_a_hang(
    gateway: Gateway,
) -> None:
    # MiniLM: a new replica takes seconds to load, which Serve's router would wait out.
    path, body = "/v1/embeddings", {"model": "minilm", "input": "the sea"}
    replica_pid, _ = replica_process("minilm")
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        assert (await session.post(path, json=body)).status_code == 200
        os.kill(replica_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        answers: list[tuple[int, float]] = []
        while True:
            assert time.monotonic() - killed_at < 120, "the model did not come back"
            started = time.monotonic()
            response = await session.post(path, json=body)
            took = time.monotonic() - started
            answers.append((response.status_code, took))
            assert response.status_code in (200, 503), response.text
            assert took < REPLICA_WAIT_S + 1.5, answers  # never Serve's unbounded wait
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "service_unavailable"
                assert int(response.headers["retry-after"]) >= 1
            elif replica_process("minilm")[0] != replica_pid:
                break  # a new replica answered
            await asyncio.sleep(0.1)
    recovered_s = time.monotonic() - killed_at
    refused = [took for status, took in answers if status == 503]
    print(f"classical model answered again {recovered_s:.1f} s after its replica died; "
          f"{len(refused)} answers 503 (max {max(refused, default=0) * 1000:.0f} ms)")


def _ingress_holding(client_port: int) -> int:
    """The ingress replica whose socket is the client's connection from ``client_port``."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "ServeReplica:" not in " ".join(process.info["cmdline"] or []) or "GatewayIngress" not in " ".join(
            process.info["cmdline"] or []
        ):
            continue
        with contextlib.suppress(psutil.Error):
            if any(c.raddr and c.raddr.port == client_port for c in process.net_connections("tcp")):
                return int(process.info["pid"])
    raise AssertionError(f"no ingress replica holds the connection from port {client_port}")


async def _handed_over(client_port: int) -> None:
    """Waits for the model's replica to hold the client's connection from ``client_port`` (the ingress
    hands it over once the stream runs, sooner or later on a loaded host)."""
    (pid, _), deadline = replica_process(VLLM_MODEL), time.monotonic() + 30
    while not any(c.raddr and c.raddr.port == client_port for c in psutil.Process(pid).net_connections("tcp")):
        assert time.monotonic() < deadline, "the stream was not handed to the model's replica"
        await asyncio.sleep(0.05)


async def _first_events(lines: AsyncIterator[str], count: int) -> AsyncIterator[str]:
    """The first ``count`` events of an SSE body's ``lines``."""
    async for line in lines:
        if line:
            yield line
            count -= 1
            if not count:
                return


async def test_a_stream_outlives_the_ingress_replica_that_handed_it_to_its_model(gateway: Gateway) -> None:
    # The model's replica writes a stream to the client's socket itself once the ingress hands it over;
    # the ingress's process dying (a crash, the OOM killer) ends only what the ingress itself would have
    # written: the body's last chunk, which the replica then writes.
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        await serving_engine_core(session)  # (a test before may have left it restarting)
        async with session.stream("POST", CHAT, json=body) as response:
            events = response.aiter_lines()
            # The frames the replica has at once come before it is handed the socket; the rest after.
            seen = [line async for line in _first_events(events, 6)]
            assert response.status_code == 200 and seen[0].startswith("data: {")
            client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
            await _handed_over(client_port)
            os.kill(_ingress_holding(client_port), signal.SIGKILL)
            rest = [line async for line in events if line]  # raises if the body breaks off
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [*seen, *rest[:-1]]]
    assert chunks[-1]["usage"]["completion_tokens"] == 400  # every token generated and sent
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    await _every_ingress_replica_listening(gateway)  # Serve replaces the ingress replica


def _ingress_replicas(port: int) -> list[psutil.Process]:
    """The test gateway's ingress replicas that listen on the front door's ``port``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if f"ServeReplica:{APP}:GatewayIngress" in " ".join(process.info["cmdline"] or []) and any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")
            ):
                found.append(process)
    return found


async def _every_ingress_replica_listening(gateway: Gateway) -> list[psutil.Process]:
    """Waits for Serve to have replaced any ingress replica a test killed (the gateway's /ready
    is answered by the others meanwhile)."""
    port = int(gateway.base_url.rsplit(":", 1)[1])
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    while len(replicas := _ingress_replicas(port)) != INGRESS_REPLICAS:
        assert time.monotonic() < deadline, f"{len(replicas)} ingress replicas listen, not {INGRESS_REPLICAS}"
        await asyncio.sleep(0.5)
    return replicas


async def test_a_client_who_connects_while_no_ingress_replica_is_up_is_answered_by_the_next(
    gateway: Gateway,
) -> None:
    # The port stays open while Serve replaces the ingress replicas (the socket the session keeps,
    # as `llm-gateway serve` does): a new connection waits for the next replica instead of being refused.
    replicas = await _every_ingress_replica_listening(gateway)
    for process in replicas:
        process.kill()
    psutil.wait_procs(replicas, timeout=10)
    assert not any(p.is_running() for p in replicas)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=RECOVERY_LIMIT_S) as session:
        response = await session.post(CHAT, json={"model": "echo", "messages": HELLO, "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    print(f"answered {time.monotonic() - started:.1f} s after both ingress replicas died")
    again = await _every_ingress_replica_listening(gateway)
    assert {p.pid for p in again}.isdisjoint(p.pid for p in replicas)
