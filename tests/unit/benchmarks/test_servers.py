"""benchmarks/servers.py: the check that a server shares the load generators' session; the
echo model added to a running gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from benchmarks import servers
from benchmarks.servers import ECHO_MODEL, add_echo, in_this_session


def server(child_in_own_session: bool) -> list[str]:
    """A process that starts a child (as ``llm-gateway serve`` starts the
    process that serves, and Ray's daemons under it) and waits."""
    child = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=%s)"
    code = f"import subprocess, sys, time; {child % child_in_own_session}; time.sleep(60)"
    return [sys.executable, "-c", code]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def with_child(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    deadline = time.monotonic() + 30
    while not psutil.Process(proc.pid).children():
        assert time.monotonic() < deadline, "the child was not started"
        time.sleep(0.05)
    return proc


def test_a_server_in_this_session_passes(started: list[subprocess.Popen[bytes]]) -> None:
    started.append(with_child(subprocess.Popen(server(child_in_own_session=False))))
    in_this_session(started[-1])


@pytest.mark.parametrize("root_in_own_session", [True, False])
def test_a_server_with_a_process_in_a_session_of_its_own_is_refused(
    started: list[subprocess.Popen[bytes]], root_in_own_session: bool
) -> None:
    command = server(child_in_own_session=not root_in_own_session)
    started.append(with_child(subprocess.Popen(command, start_new_session=root_in_own_session)))
    with pytest.raises(RuntimeError, match="not this one"):
        in_this_session(started[-1])


def test_the_echo_model_is_deployed_later_on_the_gateways_own_cluster(
    started: list[subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gateway's tree: a raylet under it names its cluster.
    raylet = f"(exec -a /opt/ray/raylet {sys.executable} -c 'import time; time.sleep(60)' --gcs-address=127.0.0.1:47123) & wait"
    started.append(with_child(subprocess.Popen(["bash", "-c", raylet])))
    monkeypatch.setattr(servers.subprocess, "Popen", lambda cmd, stdout, **_: stdout.close())  # not started here
    log = tmp_path / "bench-gateway.log"
    servers.start_gateway(Path("model"), 8102, log, echo=False)
    assert [m["name"] for m in json.loads(log.with_suffix(".yaml").read_text())["models"]] == ["tiny-chat-v1"]
    ran: list[list[str]] = []
    monkeypatch.setattr(servers.subprocess, "run", lambda cmd, **_: ran.append(cmd))
    add_echo(started[-1], log)  # type: ignore[arg-type]
    assert json.loads(log.with_suffix(".yaml").read_text())["models"][1] == ECHO_MODEL
    assert ran == [[sys.executable, "-m", "gateway.cli", "deploy", "--config", str(log.with_suffix(".yaml")),
                    "--address", "127.0.0.1:47123"]]


def test_a_gateway_from_another_checkout_runs_that_code_in_its_processes_and_theirs(tmp_path: Path) -> None:
    """``--compare-checkout``: the command, and the processes it starts (as
    Ray's daemons and workers are), import the other tree's packages, not
    this checkout's installed copy."""
    source = tmp_path / "checkout"
    (source / "gateway").mkdir(parents=True)
    (source / "gateway" / "__init__.py").write_text("")
    seen = tmp_path / "seen.json"
    (source / "gateway" / "cli.py").write_text(
        "import json, subprocess, sys, gateway\n"
        "child = subprocess.run([sys.executable, '-c', 'import gateway; print(gateway.__file__)'],\n"
        "                       cwd='/', capture_output=True, text=True).stdout.strip()\n"
        f"open({str(seen)!r}, 'w').write(json.dumps([gateway.__file__, child]))\n"
    )
    proc = servers.start_gateway(Path("model"), 8102, tmp_path / "bench-checkout.log", echo=False, source=source)
    assert proc.wait(timeout=60) == 0, (tmp_path / "bench-checkout.log").read_text()
    expected = str(source / "gateway" / "__init__.py")
    assert json.loads(seen.read_text()) == [expected, expected]
