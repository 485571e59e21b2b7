"""gateway/cli.py: `llm-gateway serve` on a front-door port that is taken, and run from a terminal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.exceptions import AuthenticationError


ROOT = Path(__file__).resolve().parents[3]


def test_serve_on_a_taken_port_says_so_before_starting_ray(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"models": [{"name": "echo", "engine": "echo"}]}))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # another gateway, say, or a stray HAProxy
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "another gateway" in done.stderr
    assert "starting Ray" not in done.stdout


@pytest.mark.parametrize("host", ["[::1]", "no-such-host.invalid"])
def test_serve_on_a_host_that_is_no_address_of_this_machine_says_what_host_takes(
    host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway import cli

    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"models": [{"name": "echo", "engine": "echo"}]}))
    assert cli._local_environment(cli.load_config(config), host, 8077) is None
    said = capsys.readouterr().err
    assert f"cannot listen on {host}:8077" in said and "--host takes an address of this machine" in said
    assert "another gateway" not in said  # nothing else listens there


def test_the_front_door_check_finds_a_free_port_free() -> None:
    from gateway.local_cluster import free_port, front_door_taken

    assert front_door_taken("127.0.0.1", free_port()) is None


# `llm-gateway serve`'s fork, in a terminal set to `tostop`: the child writes
# where the command's output goes and exits; the parent reports its status.
IN_A_TERMINAL = """
import os, sys, termios
attrs = termios.tcgetattr(0)
attrs[3] |= termios.TOSTOP
termios.tcsetattr(0, termios.TCSANOW, attrs)
from gateway import cli
status = cli._serve_in_own_group({})
if status is None:
    print("serving:", os.getpgrp() == os.getpid(), os.getsid(0) == os.getsid(os.getppid()), os.readlink("/proc/self/fd/0"))
    sys.exit(0)
print("exit status:", status)
"""


def test_the_serving_process_keeps_the_terminals_session_and_writes_to_it() -> None:
    """Run from a terminal (that stops background writers, `stty tostop`),
    the process that serves is in a group of its own in the terminal's
    session, reads nothing from the terminal, and writes to it unstopped."""
    controller, terminal = pty.openpty()
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, controller)
        proc = subprocess.Popen(
            [sys.executable, "-c", IN_A_TERMINAL], cwd=ROOT, stdin=terminal, stdout=terminal, stderr=terminal,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(terminal)
        stack.callback(proc.kill)
        output = b""
        deadline = time.monotonic() + 60
        while True:  # read to the end: a line can arrive in several reads
            assert time.monotonic() < deadline, f"the serving process was stopped: {output!r}"
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the terminal closed: every process has exited
                    break
                if not chunk:
                    break
                output += chunk
        assert proc.wait(timeout=30) == 0
    assert b"serving: True True /dev/null" in output, output
    assert b"exit status: 0" in output, output


@pytest.fixture
def signals_kept() -> Iterator[None]:
    """Restores this process's stop-signal handlers, which stopping sets."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])


@pytest.mark.usefixtures("signals_kept")
def test_stopping_on_a_joined_cluster_leaves_serves_other_applications(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray import serve

    from gateway import cli
    from gateway.config import parse_config

    done: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: done.append("left ray"))
    monkeypatch.setattr(serve, "shutdown", lambda: done.append("serve shut down"))
    monkeypatch.setattr(cli, "_drain", lambda config, cut_short: done.append("drained"))
    config = parse_config({"models": [{"name": "echo", "engine": "echo"}]})
    cli._stop_serving(config, own_cluster=False)  # `--address`: another team's applications may run there
    assert done == ["drained", "left ray"]
    done.clear()
    cli._stop_serving(config, own_cluster=True)  # the cluster this process started ends with it
    assert done == ["drained", "serve shut down", "left ray"]


def test_a_route_prefix_the_default_front_door_cannot_serve_is_refused_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to start, say "ready" and leave every client hanging on the port.
    from gateway import cli

    config = tmp_path / "gateway.yaml"
    config.write_text("route_prefix: /api\nmodels: [{name: echo, engine: echo}]\n")
    assert cli.main(["serve", "--config", str(config)]) == 2
    assert "serves only `/`" in capsys.readouterr().err


def test_a_port_out_of_range_is_a_usage_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--port", "70000"])
    assert stopped.value.code == 2 and "70000" in capsys.readouterr().err


def test_an_access_log_that_cannot_be_written_is_refused_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Else every ingress replica fails its start, and Serve retries until the deploy times out.
    from gateway import cli

    config = tmp_path / "gateway.yaml"
    config.write_text(f"ingress: {{access_log: {tmp_path}/missing/access.log}}\nmodels: [{{name: echo, engine: echo}}]\n")
    assert cli.main(["serve", "--config", str(config)]) == 2
    assert "ingress.access_log" in capsys.readouterr().err
    cli._check_access_log(str(tmp_path / "access.log"))  # a file it may create: taken


@pytest.mark.parametrize("local", [True, False])
def test_deploy_to_this_machines_cluster_refuses_an_access_log_that_cannot_be_written_before_reaching_it(
    local: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Else the running ingress replicas are replaced by ones that fail their start. A
    # remote cluster's nodes may have the folder this machine lacks: not checked here.
    from gateway import cli

    def init(**_: object) -> None:
        raise ConnectionError("reached for the cluster")

    monkeypatch.setattr("gateway.local_cluster.joining", lambda address: {"RAY_x": "1"} if local else {})
    monkeypatch.setattr("ray.init", init)
    monkeypatch.setenv("RAY_x", "0")  # (put back as it was afterwards)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"ingress: {{access_log: {tmp_path}/missing/access.log}}\nmodels: [{{name: echo, engine: echo}}]\n"
    )
    assert cli.main(["deploy", "--config", str(config)]) == (2 if local else 1)
    err = capsys.readouterr().err
    assert ("ingress.access_log" in err) is local and ("reached for the cluster" in err) is not local


HUNG_UP = """
import signal, sys, time
from gateway import cli
status = cli._serve_in_own_group({})
if status is None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # (the drain, then the exit)
    print("serving", flush=True)
    time.sleep(30)
    sys.exit(3)
print("exit status:", status, flush=True)
"""


def test_a_terminal_hang_up_stops_the_gateway_as_a_stop_signal_does() -> None:
    # `make serve` over ssh, and the connection drops: the terminal's process
    # got SIGHUP and died at once, before the serving process had drained
    # and the local cluster's files were removed.
    proc = subprocess.Popen([sys.executable, "-c", HUNG_UP], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"serving\n"
        proc.send_signal(signal.SIGHUP)
        output = proc.communicate(timeout=20)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0 and b"exit status: 0" in output, output


@pytest.mark.parametrize("command", [["status"], ["deploy", "--config", "{tmp}/gateway.yaml"]])
@pytest.mark.parametrize(
    "failure",
    [ConnectionError("Could not find any running Ray instance."),
     TimeoutError("applications ['gw'] not running in 900s"),
     AuthenticationError("no token found")],
)
def test_a_cluster_that_is_not_there_or_a_deploy_that_timed_out_is_said_in_one_line(
    command: list[str], failure: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway import cli

    (tmp_path / "gateway.yaml").write_text("models: [{name: echo, engine: echo}]\n")
    command = [part.format(tmp=tmp_path) for part in command]

    def fails(**_: object) -> None:
        raise failure

    monkeypatch.setattr("gateway.local_cluster.joining", lambda address: {})
    monkeypatch.setattr("ray.init", fails)
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert err == f"llm-gateway {command[0]}: {failure}\n"


def test_a_deploy_to_a_cluster_without_a_gateway_starts_no_serve_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Serve started by a deploy takes its defaults: a later `serve --host` would be ignored.
    from gateway import cli

    (tmp_path / "gateway.yaml").write_text("models: [{name: echo, engine: echo}]\n")
    monkeypatch.setattr("gateway.local_cluster.joining", lambda address: {})
    monkeypatch.setattr("ray.init", lambda **_: None)
    monkeypatch.setattr("ray.serve.context._get_global_client", lambda **_: None)
    monkeypatch.setattr("gateway.deploy.deploy", lambda config: pytest.fail("deployed"))
    assert cli.main(["deploy", "--config", str(tmp_path / "gateway.yaml")]) == 1
    assert "no gateway runs on this cluster; start one with `llm-gateway serve`" in capsys.readouterr().err


def test_a_gateway_that_fails_to_start_says_why_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway import cli
    from gateway.deploy import DeployFailed

    (tmp_path / "gateway.yaml").write_text("models: [{name: echo, engine: echo}]\n")

    def fails(*_: object) -> int:
        raise DeployFailed("Deploying app 'llm-gateway' failed: a replica failed to start")

    monkeypatch.setattr(cli, "serve_forever", fails)
    assert cli.main(["serve", "--config", str(tmp_path / "gateway.yaml")]) == 1
    said = "llm-gateway serve: Deploying app 'llm-gateway' failed: a replica failed to start\n"
    assert capsys.readouterr().err == said

    def breaks(*_: object) -> int:
        raise RuntimeError("dictionary changed size during iteration")  # a bug of ours: its traceback is kept

    monkeypatch.setattr(cli, "serve_forever", breaks)
    with pytest.raises(RuntimeError):
        cli.main(["serve", "--config", str(tmp_path / "gateway.yaml")])


@pytest.mark.parametrize(
    ("host", "written"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("::", "[::]"), ("gw.local", "gw.local")]
)
def test_the_address_serve_prints_is_one_a_client_can_paste(host: str, written: str) -> None:
    # `http://::1:8000/v1` is no URL: an IPv6 address goes in brackets.
    from gateway import cli

    assert cli._url_host(host) == written


def test_the_drain_waits_for_the_longest_grace_running_now(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import cli
    from gateway.config import parse_config

    config = parse_config({"models": [{"name": "a", "engine": "echo"}]})
    waited: list[float] = []
    monkeypatch.setattr("gateway.deploy.grace_s", lambda config: 600.0)
    monkeypatch.setattr("gateway.deploy.undeploy", lambda config, timeout_s: waited.append(timeout_s))
    cli._drain(config)
    assert waited == [630.0]


def test_env_prints_the_ray_environment_a_joined_cluster_must_start_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import cli
    from gateway.config import load_config

    config = tmp_path / "gateway.yaml"
    config.write_text("models: [{name: echo, engine: echo}]\nruntime: {http_proxy: haproxy, control_loop_s: 1}\n")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "900")  # an operator's own, carried
    assert cli.main(["env", "--config", str(config)]) == 0
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == load_config(config).runtime.environment()
    assert printed["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and printed["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "1.0"
    assert printed["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"] == "900"
    assert printed["RAY_SERVE_SESSION_ID_HEADER_KEY"] == "x-llm-gateway-serve-session"


def test_keys_new_says_what_is_wrong_with_a_key_in_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli

    assert cli.main(["keys", "new", "--id", "t", "--ops", "--rpm", "5"]) == 2
    assert capsys.readouterr().err == "llm-gateway: invalid key: ops key 't': rpm applies to API keys only\n"
    assert cli.main(["keys", "new", "--id", "t", "--rpm", "0"]) == 2
    assert capsys.readouterr().err == "llm-gateway: invalid key: rpm: Input should be greater than or equal to 1\n"


def test_build_model_into_a_directory_it_cannot_make_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway import cli

    (tmp_path / "file").write_text("")
    assert cli.main(["build-model", "--out", str(tmp_path / "file" / "models")]) == 1
    said = capsys.readouterr().err
    assert said.startswith("llm-gateway build-model: ") and "Traceback" not in said and said.count("\n") == 1


def test_a_port_this_user_may_not_listen_on_says_so_not_that_host_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import cli, local_cluster

    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"models": [{"name": "echo", "engine": "echo"}]}))
    denied = PermissionError(13, "Permission denied")
    monkeypatch.setattr(local_cluster, "front_door_taken", lambda host, port: denied)
    assert cli._local_environment(cli.load_config(config), "0.0.0.0", 80) is None
    said = capsys.readouterr().err
    assert "cannot listen on 0.0.0.0:80: Permission denied (ports below 1024 need privileges" in said
    assert "--host" not in said


@pytest.mark.usefixtures("signals_kept")
@pytest.mark.parametrize("own_cluster", [True, False])
def test_a_second_ctrl_c_cuts_the_drain_short_on_a_cluster_of_its_own(
    monkeypatch: pytest.MonkeyPatch, own_cluster: bool
) -> None:
    import ray
    from ray import serve

    from gateway import cli
    from gateway.config import parse_config

    done: list[str] = []

    def draining(config: object, cut_short: bool) -> None:
        for _ in range(30):  # Ctrl-C, again and again, while requests still stream
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        done.append("drained whole")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: done.append("left ray"))
    monkeypatch.setattr(serve, "shutdown", lambda: done.append("serve shut down"))
    monkeypatch.setattr(cli, "_drain", draining)
    started = time.monotonic()
    cli._stop_serving(parse_config({"models": [{"name": "echo", "engine": "echo"}]}), own_cluster=own_cluster)
    if own_cluster:  # cut short, but not by a signal within a second of the first (the first one's own copy)
        assert cli.AGAIN_AFTER_S <= time.monotonic() - started < 2.5
        assert done == ["serve shut down", "left ray"]
    else:  # a joined cluster's drain always runs whole: its removal must reach Serve
        assert done == ["drained whole", "left ray"]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a third during the shutdown ends nothing


@pytest.mark.usefixtures("signals_kept")
def test_a_stop_signal_is_taken_once_a_copy_of_it_raises_nothing_more() -> None:
    from gateway import cli

    signal.signal(signal.SIGINT, cli._raise_stop)
    signal.signal(signal.SIGTERM, cli._raise_stop)
    with pytest.raises(cli._Stop):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    os.kill(os.getpid(), signal.SIGINT)  # the parent's forwarded copy, while the first is handled
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "from gateway.cli import main; raise SystemExit(main())"
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("dashes", [["--"], []])
def test_env_runs_a_command_with_the_ray_environment(tmp_path: Path, dashes: list[str]) -> None:
    config = tmp_path / "gateway.yaml"
    # A local model directory this node lacks: the environment is still the config's.
    config.write_text(
        "models: [{name: chat, engine: vllm, model: ./not-here}]\nruntime: {http_proxy: haproxy, control_loop_s: 2}\n"
    )
    shown = "import os; print(os.environ['RAY_SERVE_CONTROL_LOOP_INTERVAL_S'], os.environ['RAY_SERVE_ENABLE_HA_PROXY'])"
    ran = _cli("env", "--config", str(config), *dashes, sys.executable, "-c", shown, cwd=tmp_path)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "2.0 1\n", "")
    # It gets the signals as a shell's child would: not Python's own SIGPIPE and SIGXFSZ ignored.
    ignored = _cli("env", "--config", str(config), *dashes, "grep", "SigIgn", "/proc/self/status", cwd=tmp_path)
    plain = subprocess.run(["grep", "SigIgn", "/proc/self/status"], capture_output=True, text=True)  # (restored)
    assert ignored.stdout == plain.stdout


def test_env_runs_nothing_when_the_config_does_not_load(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("models: [{name: chat, engine: nope}]\n")
    marker = tmp_path / "ran"
    ran = _cli("env", "--config", str(config), "--", "touch", str(marker), cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr.startswith("llm-gateway: ") and not marker.exists()
    missing = _cli("env", "--config", "/nonexistent.yaml", "--", "touch", str(marker), cwd=tmp_path)
    assert missing.returncode == 2 and not marker.exists()
    nothing = _cli("env", "--config", str(tmp_path / "x.yaml"), "--", "no-such-command-here", cwd=tmp_path)
    assert nothing.returncode == 2
    config.write_text("models: [{name: echo, engine: echo}]\n")
    unknown = _cli("env", "--config", str(config), "--", "no-such-command-here", cwd=tmp_path)
    assert unknown.returncode == 127 and "cannot run 'no-such-command-here'" in unknown.stderr


def test_serve_starts_again_where_its_proxy_was_killed_as_it_started(capsys: pytest.CaptureFixture[str]) -> None:
    # On a busy machine Serve's controller killed HAProxy's manager after its ready checks, and the
    # gateway failed to start with the killed actor's error (seen in CI).
    from ray.exceptions import ActorDiedError

    from gateway import cli

    calls: list[int] = []

    def start() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()

    cli._start_serve(start)
    assert len(calls) == 2 and "Serve's proxy was restarted as it started" in capsys.readouterr().out

    def never() -> None:
        raise ActorDiedError()

    with pytest.raises(ActorDiedError):  # not for ever
        cli._start_serve(never)


@pytest.mark.usefixtures("signals_kept")
def test_serving_on_this_machines_cluster_joins_it_as_deploy_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serve --address 127.0.0.1:P` looked for the cluster's services on this machine's network
    # address, and without the cluster's token.
    from gateway import cli

    joined: list[str | None] = []

    def init(**_: object) -> None:
        joined.append(os.environ.get("RAY_x"))
        raise ConnectionError("reached for the cluster")

    monkeypatch.setattr("gateway.local_cluster.joining", lambda address: {"RAY_x": "1"})
    monkeypatch.setattr("ray.init", init)
    monkeypatch.setattr(cli, "_stop_serving", lambda *_, **__: None)
    monkeypatch.setenv("RAY_x", "0")  # (put back as it was afterwards)
    (tmp_path / "gateway.yaml").write_text("models: [{name: echo, engine: echo}]\n")
    assert cli.main(["serve", "--config", str(tmp_path / "gateway.yaml"), "--address", "127.0.0.1:6379"]) == 1
    assert joined == ["1"]


STOPPED_AFTER = """
import os, signal
from gateway import cli
status = cli._serve_in_own_group({})
if status is None:
    os._exit(0)
os.kill(os.getpid(), signal.SIGTERM)  # a stop signal while the local cluster's files are removed
print("exit status:", status, flush=True)
"""


def test_a_stop_signal_once_the_serving_process_has_stopped_leaves_the_cleanup_alone() -> None:
    # It was passed on to the child, gone: ProcessLookupError, a traceback, exit status 1 and the files left.
    out = subprocess.run([sys.executable, "-c", STOPPED_AFTER], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "exit status: 0\n", "")
