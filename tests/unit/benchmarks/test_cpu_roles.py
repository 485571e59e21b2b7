"""benchmarks/cpu_roles.py: which process of a server is which role, and
the CPU each spent between start and stop."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from benchmarks import cpu_roles, streaming
from benchmarks.cpu_roles import CpuMeter
from benchmarks.stream_load import Figures


@dataclass
class Seen:
    """What ``role`` reads of a process."""

    pid: int
    title: str

    def name(self) -> str:
        return self.title.split()[0][:15]  # as the kernel cuts a process's name

    def cmdline(self) -> list[str]:
        return self.title.split()


@pytest.mark.parametrize(
    ("title", "direct", "expected"),
    [
        ("VLLM::Worker", False, "worker"),
        ("VLLM::Worker_TP1", True, "worker"),
        ("VLLM::EngineCore", True, "core"),
        ("ray::ServeReplica:bench:tiny-chat-v1:LLMServer:tiny-chat-v1", False, "server"),
        ("ray::ServeReplica:bench:GatewayIngress", False, "ingress"),
        ("ray::ServeController", False, "background"),
        ("ray::ServeReplica:bench:echo:EchoServer:echo", False, "background"),
        ("/usr/bin/python -m gateway.cli serve --config c.yaml", False, "background"),
    ],
)
def test_each_process_is_named_by_its_role(title: str, direct: bool, expected: str) -> None:
    assert cpu_roles.role(Seen(7, title), root_pid=1, direct=direct) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("front_door", ["ray::ProxyActor", "haproxy -f /tmp/gw/haproxy.cfg"])
def test_a_front_door_that_relays_every_chunk_is_counted_with_the_ingress(front_door: str) -> None:
    assert cpu_roles.role(Seen(7, front_door), root_pid=1, direct=False) == "ingress"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parent", "expected"), [("server", "core"), ("core", "worker"), ("background", "background"), (None, "background")]
)
def test_a_process_vllm_spawned_whose_title_did_not_take_is_named_by_its_parent(parent: str | None, expected: str) -> None:
    spawned = Seen(7, "python -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)")

    assert cpu_roles.role(spawned, root_pid=1, direct=True, parent=parent) == expected  # type: ignore[arg-type]


def test_vllms_own_server_is_its_root_process_and_a_gateways_root_is_background() -> None:
    title = "python -m vllm.entrypoints.openai.api_server --model m"

    assert cpu_roles.role(Seen(1, title), root_pid=1, direct=True) == "server"  # type: ignore[arg-type]
    assert cpu_roles.role(Seen(1, title), root_pid=1, direct=False) == "background"  # type: ignore[arg-type]


SPIN = "import time, sys\nwhile time.process_time() < float(sys.argv[1]): pass\ntime.sleep(60)"


@pytest.fixture
def server() -> Iterator[subprocess.Popen[bytes]]:
    """A root that waits on stdin and, on a line, starts a child that spends
    0.35 s of CPU (its own clock's; the kernel's ticks may read 0.01 s less)."""
    code = (
        "import subprocess, sys\n"
        f"sys.stdin.readline(); child = subprocess.Popen([sys.executable, '-c', {SPIN!r}, '0.35'])\n"
        "sys.stdout.write('started\\n'); sys.stdout.flush(); child.wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield proc
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def spent(proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Returns once the child of ``proc`` has spent ``seconds`` of CPU."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        if children and sum(children[0].cpu_times()[:2]) >= seconds:
            return
        time.sleep(0.05)
    raise TimeoutError("the child spent no CPU")


def test_the_meter_counts_a_process_started_between_start_and_stop_whole(server: subprocess.Popen[bytes]) -> None:
    meter = CpuMeter(server, direct=False)  # type: ignore[arg-type]
    meter.start()
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(b"go\n")
    server.stdin.flush()
    assert server.stdout.readline() == b"started\n"
    spent(server, 0.3)
    started = time.process_time()
    while time.process_time() - started < 0.1:  # the client: this process
        pass
    meter.stop()

    assert meter.seconds["background"] >= 0.3
    assert meter.seconds["client"] >= 0.1
    assert meter.seconds["worker"] == meter.seconds["server"] == 0.0
    assert meter.per_token_ms(100)["background"] == pytest.approx(meter.seconds["background"] * 10)


def test_the_meter_counts_only_what_was_spent_after_start(server: subprocess.Popen[bytes]) -> None:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(b"go\n")
    server.stdin.flush()
    server.stdout.readline()
    spent(server, 0.3)
    meter = CpuMeter(server, direct=False)  # type: ignore[arg-type]
    meter.start()
    meter.stop()

    assert meter.seconds["background"] < 0.1  # the child's 0.3 s came before


def test_the_medians_give_each_servers_cpu_per_token_by_role(capsys: pytest.CaptureFixture[str]) -> None:
    def figures(server_ms: float) -> Figures:
        return Figures("aiohttp", 1, 600.0, (8.0, 12.0), (1.4, 3.0), cpu_ms={"server": server_ms, "worker": 1.5})

    paired = streaming.Paired({"direct": [figures(0.34), figures(0.38), figures(0.36)], "gateway": [figures(0.40)] * 3})

    streaming.print_paired([paired], streaming.comparisons(streaming.parse_args([])))

    lines = [line for line in capsys.readouterr().out.splitlines() if "CPU ms/token" in line]
    assert len(lines) == 2
    assert "worker 1.500 core 0.000 server 0.360 ingress 0.000" in lines[0]
    assert "server 0.400" in lines[1]
