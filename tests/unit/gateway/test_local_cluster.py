"""gateway/local_cluster.py: a local cluster's settings keep it on loopback."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import local_cluster
from gateway.config import RuntimeConfig


def test_the_wrapper_moves_the_all_interface_listeners_to_loopback(tmp_path: Path) -> None:
    wrapper = local_cluster.haproxy_wrapper(tmp_path)
    fake = tmp_path / "fake-haproxy"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    wrapper.write_text(wrapper.read_text().replace(local_cluster_binary(wrapper), str(fake)))
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "frontend prometheus\n    bind :9101\nfrontend http\n    bind 0.0.0.0:8000\n"
        "frontend front\n    bind 127.0.0.1:8000\nlisten stats\n  bind *:8404\n"
    )
    out = subprocess.run([str(wrapper), "-db", "-f", str(config)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["-db", "-f", str(config)]  # the real binary gets the same arguments
    assert config.read_text() == (
        "frontend prometheus\n    bind 127.0.0.1:9101\nfrontend http\n    bind 0.0.0.0:8000\n"
        "frontend front\n    bind 127.0.0.1:8000\nlisten stats\n  bind 127.0.0.1:8404\n"
        "\n# llm-gateway front door\n"
    )
    subprocess.run([str(wrapper), "-f", str(config)], check=True, capture_output=True)
    assert config.read_text().count("# llm-gateway front door") == 1  # a reload does not add twice


def test_the_wrapper_makes_the_front_doors_own_answers_openai_shaped(tmp_path: Path) -> None:
    """On a config shaped like Ray Serve's template, checked by the real HAProxy."""
    wrapper = local_cluster.haproxy_wrapper(tmp_path, read_timeout_s=7.5)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
        f"    errorfile 502 {tmp_path}/ray500.http\n    errorfile 503 {tmp_path}/ray500.http\n"
        "frontend http_frontend\n    bind 127.0.0.1:18000\n    default_backend b\n"
        "backend b\n    server s 127.0.0.1:1\n"
    )
    out = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = config.read_text()
    assert "ray500" not in text and "timeout http-request 7500ms" in text
    assert text.index("timeout http-request") < text.index("frontend http_frontend")
    assert text.index("bad-header.json") > text.index("frontend http_frontend")
    for name, status in (("503.http", 503), ("504.http", 504)):
        head, _, body = (tmp_path / name).read_bytes().decode().partition("\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ") and f"Content-Length: {len(body)}" in head
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    assert "Retry-After: 1" in (tmp_path / "503.http").read_text()


@pytest.mark.parametrize("target", [None, "127.0.0.1:514", "/dev/log"])
def test_haproxys_per_request_syslog_goes_only_where_the_operator_asked(
    target: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's template sends every request's line (path, client address) to UDP
    127.0.0.1:514; the gateway keeps its own access log and drops that target
    unless RAY_SERVE_HAPROXY_LOG_TARGET names one. The real HAProxy accepts
    the config either way."""
    if target is None:
        monkeypatch.delenv(local_cluster.HAPROXY_LOG_TARGET, raising=False)
    else:
        monkeypatch.setenv(local_cluster.HAPROXY_LOG_TARGET, target)
    wrapper = local_cluster.haproxy_wrapper(tmp_path)
    config = tmp_path / "haproxy.cfg"
    line = f"    log {target or '127.0.0.1:514'} local0 info\n"
    config.write_text(
        f"global\n{line}    maxconn 4096\n"
        "defaults\n    mode http\n    log global\n    option httplog\n    timeout connect 5s\n"
        "    timeout client 60s\n    timeout server 60s\n"
        "frontend http_frontend\n    bind 127.0.0.1:18000\n    log global\n    default_backend b\n"
        "backend b\n    log global\n    server s 127.0.0.1:1\n"
    )
    out = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (line in config.read_text()) is (target is not None)
    assert "maxconn 4096" in config.read_text()


def test_serves_http_metrics_from_haproxy_are_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", raising=False)
    assert RuntimeConfig().environment()["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", "1")
    assert RuntimeConfig().environment()["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "1"


def local_cluster_binary(wrapper: Path) -> str:
    line = next(line for line in wrapper.read_text().splitlines() if line.startswith("exec "))
    return line.split("'")[1]


def test_the_environment_makes_a_single_machine_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(local_cluster.HAPROXY_BINARY, raising=False)  # the test session's own
    env = local_cluster.environment(RuntimeConfig())
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).is_file()
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in local_cluster.environment(RuntimeConfig(http_proxy="serve"))


def test_ray_still_reads_the_setting_and_binds_replica_grpc_as_assumed() -> None:
    """Fails loudly on a Ray upgrade that moves what the local cluster relies on."""
    from ray._private import ray_constants
    from ray.serve._private import replica

    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in inspect.getsource(ray_constants)
    assert f'add_port_to_grpc_server(self._server, "{local_cluster.ALL_INTERFACES}")' in inspect.getsource(replica)


def test_replica_grpc_is_bound_to_loopback_only_in_a_single_machine_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake = SimpleNamespace(add_port_to_grpc_server=lambda server, address: calls.append(address))
    monkeypatch.setitem(sys.modules, local_cluster.REPLICA_MODULE, fake)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    assert not local_cluster.loopback_replica_grpc()  # a real cluster: untouched
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert local_cluster.loopback_replica_grpc() and local_cluster.loopback_replica_grpc()
    fake.add_port_to_grpc_server(None, "[::]:0")
    fake.add_port_to_grpc_server(None, "10.0.0.1:5")
    assert calls == ["127.0.0.1:0", "10.0.0.1:5"]


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
    if current is not None:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(current)
    assert (local_cluster.joining(address) == local_cluster.SINGLE_MACHINE) is single


def test_a_running_local_clusters_raylet_says_where_its_gcs_is(tmp_path: Path) -> None:
    for pid, args in ((10, [b"/x/ray/raylet", b"--gcs-address=127.0.0.1:43547"]), (11, [b"python", b"--gcs-address=10.0.0.1:1"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(args))
    assert local_cluster._raylet_gcs_addresses(tmp_path) == ["127.0.0.1:43547"]
