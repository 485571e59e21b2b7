"""Each front door under `llm-gateway serve` itself: the default (the
ingress replicas listen themselves), Serve's Python proxy and Ray's HAProxy.
Streams through each, over a model with two replicas, one of which dies;
clients that leave mid-stream or before their answer; the front door's own
processes; the single-application form at a route prefix; a stop with
streams in flight.

A second, small gateway (`llm-gateway serve`, its own Ray cluster, two
ingress replicas) per front door, `runtime.http_proxy: gateway`, `serve`,
then `haproxy`: the front door is chosen when a cluster starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from gateway import sse
from gateway.affinity import reserved_cpus
from gateway.config import RuntimeConfig
from gateway.local_cluster import joining
from tests.integration.conftest import MODELS, ROOT, _free_port, _wait_ready
from tests.integration.test_listening import _loopback

APP = "front-door-test"
DOORS = ["gateway", "serve", "haproxy"]
CONFIG = {
    "app_name": APP,
    # A stop lets requests in flight run 8 - 3 s, stopping those still running 1 s before that.
    "ingress": {"num_cpus": 0.1, "num_replicas": 2, "graceful_shutdown_s": 8},
    "models": [
        {"name": "echo", "engine": "echo", "num_cpus": 0.1, "num_replicas": 2, "echo_token_delay_ms": 40},
        # Its first token 2 s after the request: a busy engine, or a long prompt.
        {"name": "slow", "engine": "echo", "num_cpus": 0.1, "echo_token_delay_ms": 2000},
    ],
}
LONG = " ".join(f"w{i}" for i in range(40))  # 40 tokens, 40 ms apart


_PROCESS: dict[str, subprocess.Popen[bytes]] = {}
_ACCESS_LOG: dict[str, Path] = {}


@pytest.fixture(scope="module", params=DOORS)
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    port = _free_port()
    config = Path(tempfile.mkstemp(suffix=".yaml")[1])
    # Pinned (not the default): the shared test gateway runs unpinned.
    access_log = Path(tempfile.mkstemp(suffix=".access.log")[1])
    _ACCESS_LOG["gateway"] = access_log
    ingress = {**CONFIG["ingress"], "access_log": str(access_log)}  # both replicas append to it
    runtime = {"http_proxy": request.param, "gateway_cpus": "auto"}
    config.write_text(json.dumps({**CONFIG, "ingress": ingress, "runtime": runtime}))
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    _PROCESS["gateway"] = proc
    try:
        _wait_ready(f"http://127.0.0.1:{port}", timeout_s=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        config.unlink()
        access_log.unlink()


def stream_body(content: str, model: str = "echo") -> dict[str, object]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": content}]}


async def read_stream(
    session: httpx.AsyncClient, content: str, started: asyncio.Semaphore | None = None, model: str = "echo"
) -> tuple[int, bytes]:
    """The stream's status and bytes; ``started`` is released at its first bytes."""
    async with session.stream("POST", "/v1/chat/completions", json=stream_body(content, model)) as response:
        chunks = []
        async for chunk in response.aiter_raw():
            if not chunks and started is not None:
                started.release()
            chunks.append(chunk)
        return response.status_code, b"".join(chunks)


def echo_replicas() -> list[psutil.Process]:
    title = f"ServeReplica:{APP}:echo:"
    return [
        p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])
    ]


@pytest.fixture
def door(base_url: str, request: pytest.FixtureRequest) -> str:
    """The front door of the module's gateway now: `gateway`, `serve` or `haproxy`."""
    return str(request.node.callspec.params["base_url"])


async def test_streams_through_the_front_door(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as session:
        async with session.stream("POST", "/v1/chat/completions", json=stream_body("one two three")) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-gateway-variant"] == "echo"
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    payloads = sse.parse(raw)
    assert payloads[-1] is None
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1] if p["choices"])
    assert text == "one two three"
    assert {p["model"] for p in payloads[:-1]} == {"echo"}


def access_lines(request_ids: set[str]) -> list[dict[str, object]]:
    """The access-log lines of ``request_ids`` once each has one (the replicas flush often)."""
    deadline = time.monotonic() + 15
    while True:
        lines = [json.loads(line) for line in _ACCESS_LOG["gateway"].read_text().splitlines()]
        lines = [line for line in lines if line["log"] == "access" and line["request_id"] in request_ids]
        if {line["request_id"] for line in lines} >= request_ids or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


async def test_a_client_that_leaves_ends_its_request_behind_the_front_door(base_url: str, door: str) -> None:
    """A stream left after its first bytes, a stream left before them and an
    answer left before it is ready are ended at once on the model replica and
    logged as the client's (499), whichever process holds the client's socket.
    Each would take 1.6 s or more to finish."""
    kinds = {"stream-left": 4, "answer-left": 4, "stream-left-before-its-first-token": 2}
    ids = {f"{door}-{kind}-{i}" for kind, count in kinds.items() for i in range(count)}

    async def leave(session: httpx.AsyncClient, request_id: str) -> None:
        body = stream_body(LONG)
        headers = {"x-request-id": request_id}
        if "answer" in request_id or "before" in request_id:
            if "answer" in request_id:
                body["stream"] = False
            else:
                body["model"] = "slow"
            with contextlib.suppress(httpx.ReadTimeout):  # the client gives up waiting
                async with session.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    raise AssertionError(f"answered {response.status_code} before the client left")
            return
        async with session.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                break  # first bytes arrived: leave mid-stream

    timeout = httpx.Timeout(30, read=0.3)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as session:
        await asyncio.gather(*(leave(session, request_id) for request_id in sorted(ids)))
    lines = access_lines(ids)
    assert sorted((line["request_id"], line["status"]) for line in lines) == [(i, 499) for i in sorted(ids)]
    # Ended when the client left, not when the model would have finished.
    slow = [(line["request_id"], line["duration_ms"]) for line in lines if float(line["duration_ms"]) > 1000]
    assert slow == [], slow
    # The front door still serves: no connection or replica was left behind.
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as session:
        status, raw = await read_stream(session, "a b c")
    assert status == 200 and raw.endswith(sse.DONE) and b'"error"' not in raw


async def test_streams_route_around_a_replica_that_dies(base_url: str) -> None:
    replicas = echo_replicas()
    assert len(replicas) == 2, "the echo model should run two replicas"
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as session:
        started = asyncio.Semaphore(0)
        in_flight = [asyncio.ensure_future(read_stream(session, LONG, started)) for _ in range(6)]
        for _ in in_flight:  # every stream has sent its first bytes, from either replica
            await asyncio.wait_for(started.acquire(), 30)
        replicas[0].send_signal(signal.SIGKILL)
        for status, raw in await asyncio.gather(*in_flight):
            # A stream on the dead replica ends with an error frame, never hangs.
            assert status == 200 and raw.endswith(sse.DONE)
            errors = [p["error"]["code"] for p in sse.parse(raw)[:-1] if "error" in p]
            assert errors in ([], ["service_unavailable"])
        started = time.monotonic()
        after = await asyncio.gather(*(read_stream(session, "a b c") for _ in range(20)))
    assert [status for status, _ in after] == [200] * 20
    assert all(raw.endswith(sse.DONE) and b'"error"' not in raw for _, raw in after)
    assert time.monotonic() - started < 30


def gateway_processes() -> dict[str, list[psutil.Process]]:
    """The gateway's processes by title (what Ray names an actor's process)."""
    processes: dict[str, list[psutil.Process]] = {}
    for process in psutil.Process(_PROCESS["gateway"].pid).children(recursive=True):
        try:
            title = (process.cmdline() or [""])[0].strip()
        except psutil.Error:
            continue
        # An actor's process is named after the actor (and its task); Ray's daemons by path.
        name = title.split(".", 1)[0] if title.startswith("ray::") else os.path.basename(title)
        processes.setdefault(name, []).append(process)
    return processes


def thread_niceness(process: psutil.Process) -> set[int]:
    """The niceness of each of the process's threads (ones that end meanwhile left out)."""
    niceness = set()
    for thread in process.threads():
        try:
            niceness.add(os.getpriority(os.PRIO_PROCESS, thread.id))
        except OSError:
            continue
    return niceness


def test_background_processes_yield_and_the_request_path_does_not(base_url: str, door: str) -> None:
    """After the replica killed above was replaced: the new one, like the
    rest of the request path, keeps the workers' niceness (0)."""
    base = {os.getpriority(os.PRIO_PROCESS, 0)}  # what the gateway's workers inherit
    background = ["ray::ServeController", f"ray::ServeReplica:{APP}:MetricsHub", "ray::DashboardAgent"]
    deadline = time.monotonic() + 30  # lowered once the app is ready, then every 10 s
    while True:
        processes = gateway_processes()
        lowered = {title: [thread_niceness(p) for p in processes.get(title, [])] for title in background}
        lowered["llm-gateway serve"] = [thread_niceness(serving_process())]
        if all(niceness == [{19}] for niceness in lowered.values()):
            break
        assert time.monotonic() < deadline, f"not lowered: {lowered}"
        time.sleep(0.2)
    # With `http_proxy: serve` Serve's proxy carries every request, with `haproxy` HAProxy.
    proxy = {"serve": ["ray::ProxyActor"], "haproxy": ["haproxy"], "gateway": []}[door]
    on_path = [*proxy, f"ray::ServeReplica:{APP}:GatewayIngress", "raylet", "gcs_server"]
    assert all(title in processes for title in on_path), sorted(processes)
    while len(replicas := echo_replicas()) != 2:
        assert time.monotonic() < deadline + 60, "the killed replica was not replaced"
        time.sleep(0.2)
    for process in replicas + [p for title in on_path for p in processes.get(title, [])]:
        assert thread_niceness(process) == base, process.cmdline()[0]


def thread_cpus(process: psutil.Process) -> set[frozenset[int]]:
    """The CPUs each of the process's threads may run on (ones that end meanwhile left out)."""
    cpus = set()
    for thread in process.threads():
        try:
            cpus.add(frozenset(os.sched_getaffinity(thread.id)))
        except OSError:
            continue
    return cpus


def test_the_gateways_processes_keep_to_the_reserved_cpus_and_model_replicas_do_not(base_url: str, door: str) -> None:
    """`runtime.gateway_cpus: auto`: on a host without a GPU, the gateway's
    processes run on the CPU vLLM reserves for everything but its workers; the
    model replicas on every CPU, the one started to replace the replica killed
    above too (it starts from a pinned Ray daemon)."""
    everything = frozenset(os.sched_getaffinity(0))  # what the gateway's processes inherit
    cpus = reserved_cpus("auto")
    expected = {frozenset(cpus)} if cpus else {everything}  # a host with one CPU: nothing pinned
    proxy = {"serve": ["ray::ProxyActor"], "haproxy": ["haproxy"], "gateway": []}[door]
    on_path = [*proxy, f"ray::ServeReplica:{APP}:GatewayIngress", "raylet", "gcs_server", "ray::ServeController"]
    deadline = time.monotonic() + 90  # pinned once the app is ready, then every 10 s; a replica replaced
    while True:
        processes = gateway_processes()
        placed = {title: [thread_cpus(p) for p in processes.get(title, [])] for title in on_path}
        replicas = {}
        for replica in echo_replicas():
            with contextlib.suppress(psutil.Error):
                if replica.status() != psutil.STATUS_ZOMBIE:  # the one killed above, until reaped
                    replicas[replica.pid] = thread_cpus(replica)
        gateway_pinned = all(found and all(c == expected for c in found) for found in placed.values())
        if gateway_pinned and len(replicas) == 2 and all(c == {everything} for c in replicas.values()):
            break
        assert time.monotonic() < deadline, f"expected {sorted(cpus or everything)}: {placed}, replicas {replicas}"
        time.sleep(0.2)


def test_the_gateway_stays_in_its_callers_session_in_a_group_of_its_own(base_url: str) -> None:
    """Linux schedules each session as one group (autogroup): the gateway's
    processes share the CPU with what else runs in the session it was started
    from, as `vllm serve`'s do (README, "Sessions and the scheduler"), while a
    signal to the command's process group still reaches the command alone."""
    command = _PROCESS["gateway"].pid
    serving = serving_process()
    assert os.getpgid(serving.pid) == serving.pid != os.getpgid(command)
    processes = gateway_processes()
    on_path = ["raylet", "gcs_server", f"ray::ServeReplica:{APP}:GatewayIngress"]
    assert all(title in processes for title in on_path), sorted(processes)
    replicas = echo_replicas()
    assert replicas
    for process in [serving, *replicas, *(p for title in on_path for p in processes[title])]:
        assert os.getsid(process.pid) == os.getsid(command), process.cmdline()[0]
    # A background group that read the terminal would be stopped: nothing is read from it.
    assert os.readlink(f"/proc/{serving.pid}/fd/0") == os.devnull


def listening(processes: dict[str, list[psutil.Process]]) -> list[tuple[str, str, int]]:
    """(process title, address, port) of every listening socket of ``processes``."""
    found = []
    for title, group in processes.items():
        for process in group:
            try:
                connections = process.net_connections(kind="inet")
            except psutil.Error:
                continue
            found += [(title, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def test_the_front_doors_own_processes_listen_on_loopback_only(base_url: str, door: str) -> None:
    processes = gateway_processes()
    sockets = listening(processes)
    port = int(base_url.rsplit(":", 1)[1])
    front = {title for title, _, bound in sockets if bound == port}
    exposed = [entry for entry in sockets if not _loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    if door != "haproxy":
        listener = {"serve": "ray::ProxyActor", "gateway": f"ray::ServeReplica:{APP}:GatewayIngress"}[door]
        # With its own front door `llm-gateway serve` keeps a socket on the port for the replicas.
        keeper = {os.path.basename(serving_process().cmdline()[0])} if door == "gateway" else set()
        assert front == {listener} | keeper and "haproxy" not in processes, (front, sorted(processes))
        if door == "gateway":  # both ingress replicas (each its own socket and the kept one), and no proxy
            on_port = [t for t, _, bound in sockets if bound == port]
            assert sorted(on_port) == sorted([*keeper, *[listener] * 4]), on_port
            assert "ray::ProxyActor" not in processes and "ray::HAProxyManager" not in processes
        return
    assert front == {"haproxy"}, front
    # More HAProxy threads than the host can spare compete with the engine's threads.
    assert {p.num_threads() for p in processes["haproxy"]} == {RuntimeConfig(gateway_cpus="auto").haproxy_thread_count()}
    # Ray Serve's admin socket takes any command (mode 666, level admin): whoever
    # may reach it could take the ingress out of the front door or redirect it.
    for process in processes["haproxy"]:
        command = process.cmdline()
        config = Path(command[command.index("-f") + 1])
        private = next(p for p in config.parents if p.name.startswith("llmgw-"))
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, private
        admin = [line.split()[2] for line in config.read_text().splitlines() if line.strip().startswith("stats socket")]
        assert admin and all(private in Path(path).parents and Path(path).is_socket() for path in admin), admin


SINGLE = {
    "app_name": "single",
    "ingress": {"num_cpus": 0.05},
    "models": [
        {"name": "s-echo", "engine": "echo", "num_cpus": 0.05},
        {"name": "s-iris", "engine": "sklearn", "model": str(MODELS / "iris"), "num_cpus": 0.05},
    ],
    "routing": {"routes": [{"name": "s-chat", "variants": {"s-echo": 1}}]},
}
DEPLOY_SINGLE = f"""
import ray
from ray import serve
from gateway.app import app_builder
ray.init(address="auto")
serve.run(app_builder({{"config": {SINGLE!r}}}), name="single", route_prefix="/single")
"""


def test_the_single_application_form_is_reached_at_its_route_prefix(
    base_url: str, door: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve run gateway.app:app_builder`: the ingress bound to its model
    deployments, beside the per-model form, at a route prefix of its own.
    That needs a proxy: with the gateway's own front door only the
    application at `/` listens, and the other takes no share of the port."""
    raylet = gateway_processes()["raylet"][0]
    gcs = [arg.split("=", 1)[1] for arg in raylet.cmdline() if arg.startswith("--gcs-address=")]
    # The cluster by its address, as `llm-gateway deploy --address` joins it
    # from a shell: with the token Ray keeps in ~/.ray for a cluster it
    # started here, and no RAY_AUTH_MODE of its own (this process has one
    # once the session's cluster started in it).
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_ADDRESS": gcs[0], **joining(gcs[0])}
    deployed = subprocess.run([sys.executable, "-c", DEPLOY_SINGLE], cwd=ROOT, env=env, timeout=240, capture_output=True)
    assert deployed.returncode == 0, deployed.stderr.decode()[-3000:]
    if door == "gateway":
        for _ in range(20):  # each on a new connection: the kernel picks a listener for each
            models = httpx.get(base_url + "/v1/models", timeout=30).json()["data"]
            assert [m["id"] for m in models] == ["echo", "slow"], models
        assert httpx.post(base_url + "/single/v1/chat/completions", json={}, timeout=30).status_code == 404
        return
    with httpx.Client(base_url=base_url + "/single", timeout=60) as single:
        chat = {"model": "s-chat", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
        answer = single.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "s-echo"
        predicted = single.post("/v1/models/s-iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert predicted.json()["predictions"][0]["label"] == "setosa"
        ready = single.get("/ready")
    assert ready.status_code == 200
    # One ingress replica: it keeps the metrics hub (and the keys' ledger) itself.
    assert set(ready.json()["deployments"]) == {"GatewayIngress", "LLMServer:s-echo", "ClassicalServer:s-iris"}


def serving_process() -> psutil.Process:
    """The process that serves: ``llm-gateway serve`` runs the gateway in a
    child in a process group of its own (and only waits for it)."""
    (child,) = psutil.Process(_PROCESS["gateway"].pid).children()
    return child


async def test_stopping_the_gateway_lets_streams_in_flight_finish(base_url: str, door: str) -> None:
    """Last in this module: it stops the gateway with SIGTERM to its whole
    process group, as ``timeout(1)`` or a shell's ``kill %1`` do. Ray's
    daemons it started must not get it too: they are needed for the drain.
    Through the gateway's own front door, a stream that would outlast the
    ingress's grace (20 s of the slow model's tokens) is stopped with an
    error frame and its end. (Behind Serve's proxy or HAProxy, Serve drains
    the ingress replica, not the gateway: a stream its model replica writes
    to the client's socket itself goes on to its end there.)"""
    proc = _PROCESS["gateway"]
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as session:
        started = asyncio.Semaphore(0)
        in_flight = [asyncio.ensure_future(read_stream(session, LONG, started)) for _ in range(4)]
        if door == "gateway":
            in_flight.append(asyncio.ensure_future(read_stream(session, "a b c d e f g h i j", started, "slow")))
        for _ in in_flight:
            await asyncio.wait_for(started.acquire(), 30)
        os.killpg(proc.pid, signal.SIGTERM)
        results = await asyncio.gather(*in_flight)
    if door == "gateway":
        status, raw = results.pop()
        events = sse.parse(raw)
        assert status == 200 and raw.endswith(sse.DONE) and events[-2]["error"]["code"] == "shutting_down", raw[-300:]
    for status, raw in results:
        assert status == 200 and raw.endswith(sse.DONE) and b'"error"' not in raw, raw[-300:]
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in sse.parse(raw)[:-1] if p["choices"])
        assert text == LONG  # every token, none cut off
    assert proc.wait(timeout=90) == 0
