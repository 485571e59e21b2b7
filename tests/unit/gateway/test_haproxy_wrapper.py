"""gateway/haproxy_wrapper.py: the wrapper moves Ray's all-interface
listeners to loopback, the front door to the address asked for, makes the
front door's own answers OpenAI-shaped, and dies with its parent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from gateway import haproxy_wrapper as wrapping


def wrapper_before_echo(tmp_path: Path, front_door: str = wrapping.LOOPBACK) -> Path:
    """The wrapper, execing a stand-in that prints its arguments instead of HAProxy."""
    wrapper = wrapping.haproxy_wrapper(tmp_path, front_door=front_door)
    fake = tmp_path / "fake-haproxy"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    wrapper.write_text(wrapper.read_text().replace(haproxy_binary(wrapper), str(fake)))
    return wrapper


def _without_rules(config: str) -> list[str]:
    """The config's lines but the front door's own rules (``frontend.cfg``)."""
    return [line for line in config.split("\n") if not line.lstrip().startswith(("http-request ", "http-response "))]


def test_the_wrapper_moves_the_all_interface_listeners_to_loopback(tmp_path: Path) -> None:
    wrapper = wrapper_before_echo(tmp_path)
    config = tmp_path / "haproxy.cfg"
    # Shaped like Ray Serve's template with ``--host 0.0.0.0``: the front doors
    # bind every interface as asked (``*``); the rest moves to loopback.
    config.write_text(
        "frontend prometheus\n    bind :9101\n    mode http\nfrontend http_frontend\n    bind *:8000\n"
        "    mode http\n    # bind :1 (a comment stays)\nbackend b\n    bind :7000\n"
        "frontend grpc_frontend\n    bind *:9000 proto h2\nfrontend http\n    bind 0.0.0.0:8001\n"
        "frontend front\n    bind 127.0.0.1:8002\nlisten stats\n  bind *:8404\n"
    )
    out = subprocess.run([str(wrapper), "-db", "-f", str(config)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["-db", "-f", str(config)]  # the real binary gets the same arguments
    rewritten = _without_rules(config.read_text())
    assert "\n".join(rewritten) == (
        "frontend prometheus\n    bind 127.0.0.1:9101\n    mode http\nfrontend http_frontend\n    bind *:8000\n"
        "    mode http\n    # bind :1 (a comment stays)\nbackend b\n    bind 127.0.0.1:7000\n"
        "frontend grpc_frontend\n    bind *:9000 proto h2\nfrontend http\n    bind 0.0.0.0:8001\n"
        "frontend front\n    bind 127.0.0.1:8002\nlisten stats\n  bind 127.0.0.1:8404\n"
        "\n# llm-gateway front door\n"
    )
    subprocess.run([str(wrapper), "-f", str(config)], check=True, capture_output=True)
    assert config.read_text().count("# llm-gateway front door") == 1  # a reload does not add twice


def ray_like_config(front: int, back: int, defaults: str = "") -> str:
    """A config shaped like Ray Serve's template: the front door on ``front``, a server on ``back``."""
    return (
        "global\n    maxconn 100\n    tune.bufsize 65536\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 3600s\n    timeout server 60s\n"
        + defaults
        + f"frontend http_frontend\n    bind 127.0.0.1:{front}\n    default_backend b\n"
        f"backend b\n    server s 127.0.0.1:{back}\n"
    )


def test_the_wrapper_makes_the_front_doors_own_answers_openai_shaped(tmp_path: Path) -> None:
    """On a config shaped like Ray Serve's template, checked by the real HAProxy."""
    wrapper = wrapping.haproxy_wrapper(tmp_path, read_timeout_s=7.5)
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_like_config(
        18000, 1, f"    errorfile 502 {tmp_path}/ray500.http\n    errorfile 503 {tmp_path}/ray500.http\n"
    ))
    out = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = config.read_text()
    assert "ray500" not in text and "timeout http-request 7500ms" in text
    assert text.index("timeout http-request") < text.index("frontend http_frontend")
    # A client that neither sends nor reads: dropped after twice the read
    # timeout (the ingress's 408 for a stalled body comes first), not Ray's hour.
    assert [line.strip() for line in text.splitlines() if "timeout client" in line] == ["timeout client 15000ms"]
    assert "http-response set-header connection close if { status 408 }" in text
    assert text.index("bad-header.json") > text.index("frontend http_frontend")
    assert text.index("tune.http.maxhdr") < text.index("defaults")
    for name, code in (("uri-too-long.json", "uri_too_long"), ("head-too-large.json", "headers_too_large")):
        assert text.index(name) > text.index("frontend http_frontend")
        error = json.loads((tmp_path / name).read_text())["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error" and "16 KiB" in error["message"]
    for name, status in (("503.http", 503), ("504.http", 504)):
        head, _, body = (tmp_path / name).read_bytes().decode().partition("\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ") and f"Content-Length: {len(body)}" in head
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    assert "Retry-After: 1" in (tmp_path / "503.http").read_text()


def test_a_client_that_leaves_before_its_answer_has_its_request_aborted(tmp_path: Path) -> None:
    """Ray's template (`option abortonclose`, `option splice-request`) run
    through the wrapper by the real HAProxy: a client sends its request's
    head, then its body (two writes, as httpx and the OpenAI SDK do), then
    leaves while the server works on it. The server's connection must close
    then, for the ingress to abort the engine request, not 3 s later when
    the answer is ready."""
    from gateway.local_cluster import free_port

    server = socket.create_server(("127.0.0.1", 0))
    front = free_port()
    seen: list[str] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"{}"):
                data += conn.recv(65536)
            conn.settimeout(3)  # the "model" takes 3 s to answer
            try:
                seen.append("closed" if conn.recv(1) == b"" else "more data")
            except ConnectionResetError:
                seen.append("closed")
            except TimeoutError:
                seen.append("kept open")

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    wrapper = wrapping.haproxy_wrapper(tmp_path)
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_like_config(
        front, server.getsockname()[1], "    option abortonclose\n    option splice-request\n    option splice-response\n"
    ))
    haproxy = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", front))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and haproxy.poll() is None, "HAProxy did not start"
                time.sleep(0.05)
        with client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n")
            time.sleep(0.05)  # the body as a write of its own
            client.sendall(b"{}")
            time.sleep(0.2)  # the request has reached the server
        worker.join(timeout=5)
    finally:
        haproxy.kill()
        haproxy.wait()
        server.close()
    assert seen == ["closed"]
    assert "splice-request" not in config.read_text()


@pytest.mark.parametrize("target", [None, "127.0.0.1:514", "/dev/log"])
def test_haproxys_per_request_syslog_goes_only_where_the_operator_asked(
    target: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's template sends every request's line (path, client address) to UDP
    127.0.0.1:514; the gateway keeps its own access log and drops that target
    unless RAY_SERVE_HAPROXY_LOG_TARGET names one. The real HAProxy accepts
    the config either way."""
    if target is None:
        monkeypatch.delenv(wrapping.HAPROXY_LOG_TARGET, raising=False)
    else:
        monkeypatch.setenv(wrapping.HAPROXY_LOG_TARGET, target)
    wrapper = wrapping.haproxy_wrapper(tmp_path)
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


def test_haproxy_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A stray HAProxy keeps the front door's port and answers 503 for ever."""
    wrapper = wrapping.haproxy_wrapper(tmp_path)
    fake = tmp_path / "fake-haproxy"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")  # stays this process, as HAProxy would
    fake.chmod(0o755)
    wrapper.write_text(wrapper.read_text().replace(haproxy_binary(wrapper), str(fake)))
    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n")
    # A parent that starts the wrapper, prints its pid and is then killed.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         f"p = subprocess.Popen([{str(wrapper)!r}, '-f', {str(config)!r}]); print(p.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    with parent.stdout:
        child = psutil.Process(int(parent.stdout.readline()))
    deadline = time.monotonic() + 10
    while "sleep" not in child.cmdline():  # the wrapper has become the (fake) HAProxy
        assert time.monotonic() < deadline, child.cmdline()
        time.sleep(0.05)
    assert child.is_running()
    parent.kill()
    parent.wait()
    child.wait(timeout=10)  # gone (psutil.TimeoutExpired otherwise); not our child: no exit status


def haproxy_binary(wrapper: Path) -> str:
    line = next(line for line in wrapper.read_text().splitlines() if line.startswith("exec "))
    return line.split("'")[-2]  # the last quoted word: HAProxy's path


@pytest.mark.parametrize(
    ("host", "bind"),
    [("0.0.0.0", "*:{}"), ("::", ":::{} v4v6"), ("192.0.2.2", "192.0.2.2:{}"), ("127.0.0.1", "127.0.0.1:{}")],
)
def test_the_wrapper_puts_the_front_door_on_the_address_asked_for(tmp_path: Path, host: str, bind: str) -> None:
    """Serve is given loopback, where it binds its fallback proxy: the front
    doors Ray's template then writes on 127.0.0.1 move to ``--host``, as Ray
    writes an address there (``*`` for every IPv4 interface; ``::`` takes
    both families, as the gateway's own front door does); the rest stays.
    Sections in the order of Ray's template."""
    wrapper = wrapper_before_echo(tmp_path, front_door=host)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "frontend http_frontend\n    bind 127.0.0.1:8000\n    mode http\n"
        "backend b\n    server s 127.0.0.1:30000 check\n    server f 127.0.0.1:8500 check backup\n"
        "frontend grpc_frontend\n    bind 127.0.0.1:9000 proto h2\n"
        "listen stats\n  bind *:8404\n"
    )
    subprocess.run([str(wrapper), "-db", "-f", str(config)], capture_output=True, check=True)
    rewritten = _without_rules(config.read_text())
    assert "\n".join(rewritten) == (
        f"frontend http_frontend\n    bind {bind.format(8000)}\n    mode http\n"
        "backend b\n    server s 127.0.0.1:30000 check\n    server f 127.0.0.1:8500 check backup\n"
        f"frontend grpc_frontend\n    bind {bind.format(9000)} proto h2\n"
        "listen stats\n  bind 127.0.0.1:8404\n"
        "\n# llm-gateway front door\n"
    )


@pytest.mark.parametrize("host", ["", "1.2.3.4'; touch x; '", "a b", "h/1", "x&y", "h\u00e9"])
def test_a_front_door_address_that_is_not_one_is_refused_before_the_wrapper_is_written(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="front door address"):
        wrapping.haproxy_wrapper(tmp_path, front_door=host)
    assert not (tmp_path / "haproxy").exists()


@pytest.mark.parametrize("failure", ["sed-fails", "part-missing"])
def test_a_config_the_wrapper_could_not_edit_starts_no_haproxy(tmp_path: Path, failure: str) -> None:
    # It started HAProxy on Ray's config as written (stats and Prometheus on every interface), and marked
    # the config edited, so that no reload edited it either.
    wrapper = wrapper_before_echo(tmp_path)
    config = tmp_path / "haproxy.cfg"
    config.write_text("frontend prometheus\n    bind :9101\n")
    env = dict(os.environ)
    if failure == "sed-fails":  # a full disk, say: sed -i cannot write its copy
        tools = tmp_path / "bin"
        tools.mkdir()
        (tools / "sed").write_text("#!/bin/sh\nexit 4\n")
        (tools / "sed").chmod(0o755)
        env["PATH"] = f"{tools}:{env['PATH']}"
    else:
        (tmp_path / "defaults.cfg").unlink()
    out = subprocess.run([str(wrapper), "-f", str(config)], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and out.stdout == ""  # HAProxy (here its stand-in) never ran
    assert "llm-gateway:" in out.stderr
    assert config.read_text() == "frontend prometheus\n    bind :9101\n"
