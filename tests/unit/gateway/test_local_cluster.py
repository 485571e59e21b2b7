"""gateway/local_cluster.py: a local cluster's settings keep it on loopback."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shlex
import socket
import stat
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from gateway import affinity, local_cluster
from gateway.config import ConfigError, RuntimeConfig
from gateway.config.front_door import HEAD_BYTES
from gateway.http.front_door_socket import KEEPER_VARIABLE


def test_serves_http_metrics_from_haproxy_are_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", raising=False)
    assert RuntimeConfig().environment()["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", "1")
    assert RuntimeConfig().environment()["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "1"


def test_rays_idle_work_is_turned_down_unless_the_operator_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_task_events_report_interval_ms", "RAY_enable_metrics_collection",
                 "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"):
        monkeypatch.delenv(name, raising=False)
    env = RuntimeConfig().environment()
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert env["RAY_task_events_report_interval_ms"] == "0"
    assert env["RAY_enable_metrics_collection"] == "0"
    assert env["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    monkeypatch.setenv("RAY_task_events_report_interval_ms", "1000")
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    env = RuntimeConfig.model_validate({"control_loop_s": 0.1}).environment()
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert (env["RAY_task_events_report_interval_ms"], env["RAY_enable_metrics_collection"]) == ("1000", "1")
    # Ray's metrics back on: Serve exports its own as often as Ray would.
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "100"
    monkeypatch.setenv("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "250")
    assert RuntimeConfig().environment()["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "250"
    with pytest.raises(ValidationError):
        RuntimeConfig.model_validate({"control_loop_s": 0})


def test_ray_still_reads_the_settings_the_runtime_turns_down() -> None:
    """Fails loudly on a Ray upgrade that renames one: it would then be silently ignored."""
    import ray
    from ray._private import log_monitor
    from ray.serve._private import constants

    assert '"RAY_SERVE_CONTROL_LOOP_INTERVAL_S"' in inspect.getsource(constants)
    assert '"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"' in inspect.getsource(constants)
    assert '"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"' in inspect.getsource(log_monitor)
    # Read by Ray's C++ core in every process (RayConfig, `RAY_<name>`).
    core = (Path(ray.__file__).parent / "_raylet.so").read_bytes()
    for name in (b"task_events_report_interval_ms", b"enable_metrics_collection"):
        assert b"\0" + name + b"\0" in core, name


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_haproxy_threads_follow_the_machine_by_default(
    monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    runtime = RuntimeConfig()
    assert runtime.haproxy_threads == "auto"
    assert runtime.environment()["RAY_SERVE_HAPROXY_NBTHREAD"] == str(threads)


def test_haproxy_threads_are_capped_by_the_cpus_it_is_pinned_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(affinity, "_has_gpu", lambda: False)
    assert RuntimeConfig(gateway_cpus=[14, 15]).haproxy_thread_count() == 2
    assert RuntimeConfig(gateway_cpus="auto").haproxy_thread_count() == 1  # the one CPU vLLM reserves
    assert RuntimeConfig(gateway_cpus="off").haproxy_thread_count() == 4
    monkeypatch.setattr(affinity, "_has_gpu", lambda: True)  # nothing pinned on a GPU host
    assert RuntimeConfig(gateway_cpus="auto").haproxy_thread_count() == 4
    assert RuntimeConfig(haproxy_threads=8, gateway_cpus=[15]).haproxy_thread_count() == 8  # as asked


def test_haproxy_threads_must_be_a_positive_count() -> None:
    with pytest.raises(ValidationError):
        RuntimeConfig(haproxy_threads=0)
    with pytest.raises(ValidationError):
        RuntimeConfig(haproxy_threads="many")


HAPROXY = RuntimeConfig(http_proxy="haproxy")


def test_the_environment_makes_a_single_machine_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [local_cluster.HAPROXY_BINARY, *local_cluster.HAPROXY_PATHS]:
        monkeypatch.delenv(name, raising=False)  # the test session's own
    env = local_cluster.environment(HAPROXY)
    try:
        assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        assert Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).is_file()
        # Room for heads past the gateway's limits, which its rules answer in OpenAI's shape.
        assert int(env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) > HEAD_BYTES
    finally:
        local_cluster.remove_local_files(env)
    assert not Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).parent.exists()
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in local_cluster.environment(RuntimeConfig(http_proxy="serve"))


def test_an_operators_own_haproxy_is_wrapped_as_the_bundled_one_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Else its stats and Prometheus listeners stayed on every interface, and its errors plain text.
    for name in [local_cluster.HAPROXY_BINARY, *local_cluster.HAPROXY_PATHS]:
        monkeypatch.delenv(name, raising=False)
    own = tmp_path / "operator's haproxy 3.3"
    own.write_text("#!/bin/sh\nexit 0\n")
    own.chmod(0o755)
    monkeypatch.setenv(local_cluster.HAPROXY_BINARY, str(own))
    env = local_cluster.environment(HAPROXY, front_door="0.0.0.0")
    try:
        wrapper = Path(env[local_cluster.HAPROXY_BINARY])
        assert wrapper != own and shlex.quote(str(own)) in wrapper.read_text()
        assert local_cluster.serve_host(env, "0.0.0.0") == "127.0.0.1"  # Serve's fallback proxy on loopback
        monkeypatch.setenv(local_cluster.HAPROXY_BINARY, str(wrapper))  # a gateway this one starts
        assert local_cluster.HAPROXY_BINARY not in local_cluster.environment(HAPROXY)  # its wrapper, as it is
    finally:
        local_cluster.remove_local_files(env)
    assert own.exists()


def test_an_haproxy_path_that_names_none_is_a_config_error_leaving_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [local_cluster.HAPROXY_BINARY, *local_cluster.HAPROXY_PATHS]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(local_cluster.HAPROXY_BINARY, str(tmp_path / "gone" / "haproxy"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ConfigError, match="runtime.http_proxy haproxy: .*does not point to an executable"):
        local_cluster.environment(HAPROXY)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_reloaded_haproxy_lets_its_streams_run_ten_minutes_not_two(monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve reloads HAProxy as ingress replicas come and go; the old process cut its streams at 120 s.
    monkeypatch.delenv("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", raising=False)
    assert HAPROXY.environment()["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"] == "600"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "1800")  # the operator's own
    assert HAPROXY.environment()["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"] == "1800"


def test_behind_haproxy_serve_itself_listens_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [local_cluster.HAPROXY_BINARY, *local_cluster.HAPROXY_PATHS]:
        monkeypatch.delenv(name, raising=False)
    env = local_cluster.environment(HAPROXY, front_door="0.0.0.0")
    try:
        assert local_cluster.serve_options(HAPROXY, env, "0.0.0.0", 8123)["http_options"]["host"] == "127.0.0.1"
    finally:
        local_cluster.remove_local_files(env)


def test_the_default_front_door_is_the_ingress_replicas_with_no_proxy() -> None:
    """`http_proxy: gateway`: no HAProxy, Serve's proxies off (its replicas'
    own HTTP servers too), and the ingress replicas given the address asked for."""
    runtime = RuntimeConfig()
    assert runtime.http_proxy == "gateway"
    env = local_cluster.environment(runtime, front_door="0.0.0.0")
    assert local_cluster.HAPROXY_BINARY not in env
    assert (env["RAY_SERVE_ENABLE_HA_PROXY"], env["RAY_SERVE_ENABLE_DIRECT_INGRESS"]) == ("0", "0")
    assert local_cluster.serve_options(runtime, env, "0.0.0.0", 8123) == {
        "proxy_location": "Disabled",
        "http_options": {"host": "0.0.0.0", "port": 8123},
    }
    # The name of the socket keeper the ingress replicas ask for the port's kept socket: a new one each cluster.
    assert env[KEEPER_VARIABLE] != local_cluster.environment(runtime)[KEEPER_VARIABLE]
    assert KEEPER_VARIABLE not in local_cluster.environment(RuntimeConfig(http_proxy="serve"))
    for door in ("haproxy", "serve"):
        other = RuntimeConfig(http_proxy=door)
        assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in other.environment()
        assert local_cluster.serve_options(other, {}, "127.0.0.1", 8123)["proxy_location"] is None


def test_haproxys_files_and_admin_socket_go_into_a_private_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [local_cluster.HAPROXY_BINARY, *local_cluster.HAPROXY_PATHS]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", str(tmp_path / "state"))  # one set: kept
    env = local_cluster.environment(HAPROXY)
    try:
        private = Path(env[local_cluster.HAPROXY_BINARY]).parent
        assert private.stat().st_mode & 0o777 == 0o700
        assert env["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] == str(tmp_path / "state")
        for name in set(local_cluster.HAPROXY_PATHS) - {"RAY_SERVE_HAPROXY_SERVER_STATE_FILE"}:
            assert env[name] == str(private) or Path(env[name]).parent == private, name
        # Ray Serve puts each file in a folder named by the node's id; HAProxy binds
        # a socket as <path>.<pid>.tmp first. A Unix socket's path holds 107 bytes.
        for name in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
            folder, file = os.path.split(env[name])
            node = Path(folder) / ("f" * 56)
            node.mkdir(exist_ok=True)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(node / file) + ".4194304.tmp")
    finally:
        local_cluster.remove_local_files(env)
    assert not private.exists()


def test_each_local_cluster_gets_haproxys_side_ports_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve gives every HAProxy ports 8404 and 9101, and every fallback
    proxy 8500 and 9500: a second gateway on the machine could not start its
    front door, or its fallback."""
    side = [*local_cluster.HAPROXY_PORTS, *local_cluster.FALLBACK_PORTS]
    for name in [local_cluster.HAPROXY_BINARY, *local_cluster.HAPROXY_PATHS, *side]:
        monkeypatch.delenv(name, raising=False)
    first = local_cluster.environment(HAPROXY)
    listening = [socket.create_server(("127.0.0.1", int(first[name]))) for name in side]  # its HAProxy, up
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # one set: kept
    second = local_cluster.environment(HAPROXY)
    for sock in listening:
        sock.close()
    try:
        ports = [int(env[name]) for env in (first, second) for name in side]
        assert ports[len(side)] == 18404 and len(set(ports)) == 2 * len(side)
        for port in ports[:len(side)] + ports[len(side) + 1:]:
            assert local_cluster.front_door_taken("127.0.0.1", port) is None
    finally:
        local_cluster.remove_local_files(first)
        local_cluster.remove_local_files(second)
    from ray.serve._private import constants

    for name in side:  # still read by Ray Serve
        assert f'"{name}"' in inspect.getsource(constants)


def test_serve_is_given_loopback_where_the_wrapper_moves_the_front_door(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(local_cluster.HAPROXY_BINARY, raising=False)
    env = local_cluster.environment(HAPROXY, front_door="0.0.0.0")
    try:
        assert local_cluster.serve_host(env, "0.0.0.0") == "127.0.0.1"
        assert "bind[[:space:]]+)127[.]0[.]0[.]1" in Path(env[local_cluster.HAPROXY_BINARY]).read_text()
    finally:
        local_cluster.remove_local_files(env)
    # Serve's own proxy is the front door: it binds the address asked for.
    assert local_cluster.serve_host(local_cluster.environment(RuntimeConfig(http_proxy="serve")), "0.0.0.0") == "0.0.0.0"
    # A HAProxy of the user's own reads Ray's template as it is.
    monkeypatch.setenv(local_cluster.HAPROXY_BINARY, "/usr/sbin/haproxy")
    assert local_cluster.serve_host(local_cluster.environment(RuntimeConfig()), "0.0.0.0") == "0.0.0.0"


def test_ray_still_reads_the_setting_and_binds_replica_grpc_as_assumed() -> None:
    """Fails loudly on a Ray upgrade that moves what the local cluster relies on."""
    from ray._private import ray_constants
    from ray.serve._private import replica

    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in inspect.getsource(ray_constants)
    assert f'add_port_to_grpc_server(self._server, "{local_cluster.ALL_INTERFACES}")' in inspect.getsource(replica)
    # The direct-ingress HTTP server: started through the module's own name, with
    # the HTTP options (the front door's host) as second argument.
    assert "return await start_asgi_http_server(\n" in inspect.getsource(replica)
    assert list(inspect.signature(replica.start_asgi_http_server).parameters)[:2] == ["app", "http_options"]


async def test_replica_servers_are_bound_to_loopback_only_in_a_single_machine_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    hosts: list[str] = []

    async def start_asgi_http_server(app: object, http_options: object, **kwargs: object) -> None:
        hosts.append(http_options.host)  # type: ignore[attr-defined]

    fake = SimpleNamespace(
        add_port_to_grpc_server=lambda server, address: calls.append(address),
        start_asgi_http_server=start_asgi_http_server,
    )
    monkeypatch.setitem(sys.modules, local_cluster.REPLICA_MODULE, fake)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    assert not local_cluster.loopback_replica_servers()  # a real cluster: untouched
    assert fake.start_asgi_http_server is start_asgi_http_server
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert local_cluster.loopback_replica_servers() and local_cluster.loopback_replica_servers()
    fake.add_port_to_grpc_server(None, "[::]:0")
    fake.add_port_to_grpc_server(None, "10.0.0.1:5")
    assert calls == ["127.0.0.1:0", "10.0.0.1:5"]
    from ray.serve.config import HTTPOptions

    for host in ("0.0.0.0", "192.0.2.2", "127.0.0.1"):
        await fake.start_asgi_http_server(None, HTTPOptions(host=host, port=8000))
    assert hosts == ["127.0.0.1"] * 3  # wrapped once, however often applied


async def test_a_replica_s_own_http_server_listens_on_loopback_whatever_the_front_door_binds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's own server start, as a replica of the local cluster runs it, asked
    for every interface (``--host 0.0.0.0``): HAProxy reaches it at 127.0.0.1,
    nothing else can."""
    from ray.serve._private import replica
    from ray.serve.config import HTTPOptions

    monkeypatch.setattr(replica, "start_asgi_http_server", replica.start_asgi_http_server)
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert local_cluster.loopback_replica_servers()

    async def app(scope: dict, receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task, server = await replica.start_asgi_http_server(
        app, HTTPOptions(host="0.0.0.0", port=port), event_loop=asyncio.get_running_loop()
    )
    try:
        for _ in range(200):  # uvicorn starts listening in the task
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        bound = {sock.getsockname()[0] for srv in server.servers for sock in srv.sockets}
        assert bound == {"127.0.0.1"}
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 204")
        writer.close()
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize(
    ("address", "current", "single"),
    [
        ("auto", "127.0.0.1:6379", True),
        ("auto", "10.0.0.7:6379", False),
        ("auto", None, False),
        ("127.0.0.1:6379", None, True),
        ("ray://localhost:10001", None, True),
        ("10.1.2.3:6379", "127.0.0.1:1", False),
    ],
)
def test_commands_join_a_loopback_cluster_as_one(
    address: str, current: str | None, single: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_cluster.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setattr(local_cluster, "_raylet_gcs_addresses", lambda: [])  # none running here
    monkeypatch.setattr(local_cluster, "_token_available", lambda: False)
    if current is not None:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(current)
    assert (local_cluster.joining(address) == local_cluster.SINGLE_MACHINE) is single


@pytest.mark.parametrize(
    ("address", "token", "mode", "joined"),
    [
        ("127.0.0.1:6379", "file", None, "token"),  # as Ray joins a local cluster it finds itself
        ("127.0.0.1:6379", "env", None, "token"),
        ("127.0.0.1:6379", None, None, None),  # no token: nothing to authenticate with
        ("127.0.0.1:6379", "file", "disabled", None),  # the user's own choice stands
        ("10.1.2.3:6379", "file", None, None),  # a remote cluster: as Ray joins it
    ],
)
def test_a_local_cluster_given_by_address_is_joined_with_the_token_ray_keeps_here(
    address: str, token: str | None, mode: str | None, joined: str | None,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_cluster.Path, "home", lambda: tmp_path)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    if token == "file":
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    elif token == "env":
        monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    if mode is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    assert local_cluster.joining(address).get("RAY_AUTH_MODE") == joined


def test_a_running_local_clusters_raylet_says_where_its_gcs_is(tmp_path: Path) -> None:
    for pid, args in ((10, [b"/x/ray/raylet", b"--gcs-address=127.0.0.1:43547"]), (11, [b"python", b"--gcs-address=10.0.0.1:1"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(args))
    assert local_cluster._raylet_gcs_addresses(tmp_path) == ["127.0.0.1:43547"]


def test_side_ports_are_picked_where_the_kernel_hands_out_none_itself() -> None:
    """A port of the kernel's ephemeral range, free when picked, can be taken by
    any ``bind(0)`` or outgoing connection before HAProxy binds it (a gateway
    failed to start so); picked below that range, only an explicit bind can."""
    first, last = map(int, local_cluster.EPHEMERAL_PORTS.read_text().split())
    ports = [local_cluster.free_port() for _ in range(20)]
    assert all(port in local_cluster.PORT_CANDIDATES and not first <= port <= last for port in ports)
    for port in ports:
        assert local_cluster.front_door_taken("127.0.0.1", port) is None


def test_a_port_taken_or_picked_already_is_not_picked_again() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, socket.create_server(("127.0.0.1", 0)) as picked:
        busy, excluded = taken.getsockname()[1], picked.getsockname()[1]
        picked.close()  # free again, but another pick of the same start-up has it
        with socket.create_server(("127.0.0.1", 0)) as spare:
            free = spare.getsockname()[1]
        ports = {local_cluster.free_port(candidates=[busy, excluded, free], exclude=[excluded]) for _ in range(10)}
        assert ports == {free}
        # None free among them: the system's pick.
        assert local_cluster.free_port(candidates=[busy]) != busy


def test_the_clusters_token_is_readable_by_its_user_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    local_cluster.private_token(tmp_path)  # none yet: made as Ray would, but private
    made = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600 and stat.S_IMODE(made.parent.stat().st_mode) == 0o700
    assert re.fullmatch("[0-9a-f]{64}", made.read_text())
    made.chmod(0o644)  # as Ray writes its own
    local_cluster.private_token(tmp_path)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600  # the same token, no longer readable by others
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    local_cluster.private_token(tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    monkeypatch.delenv("RAY_AUTH_MODE")
    shared = tmp_path / "team-token"
    shared.write_text("t")
    shared.chmod(0o640)  # the operator's own token, read by their group on purpose
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(shared))
    local_cluster.private_token(tmp_path / "elsewhere")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640 and not (tmp_path / "elsewhere").exists()
