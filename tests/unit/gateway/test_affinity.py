"""gateway/affinity.py: the gateway's processes leave the engine's cores alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import affinity
from gateway.config import ConfigError, parse_config

ALL = set(range(os.cpu_count() or 1))


@pytest.mark.parametrize(
    ("setting", "cpus", "env", "expected"),
    [
        ("off", {0, 1, 2, 3}, None, None),
        ([1], {0, 1, 2, 3}, None, {1}),
        ("auto", {0, 1, 2, 3}, None, {3}),
        ("auto", {0, 1, 2, 3}, "2", {2, 3}),
        ("auto", {0, 1}, "4", None),  # vLLM reserves none of so few: its threads use them all
        ("auto", {0, 1, 2, 3}, "0", None),  # none reserved: nothing is left to the gateway
        ("auto", {5}, None, None),  # one CPU: nothing to keep apart
    ],
)
def test_reserved_cpus_follow_vllms_reservation(
    monkeypatch: pytest.MonkeyPatch, setting: object, cpus: set[int], env: str | None, expected: set[int] | None
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(affinity, "_has_gpu", lambda: False)
    monkeypatch.setattr(affinity, "_topology", lambda cpu: (0, (0, cpu)))  # one node, no SMT
    if env is None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", env)
    assert affinity.reserved_cpus(setting) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("machine", "topology", "computing", "expected"),
    [
        # 2 vCPUs, one core's two threads: vLLM computes on CPU 1 alone and
        # reserves nothing; the last CPU was that very one.
        ("x86_64", {0: (0, (0, 0)), 1: (0, (0, 0))}, [1], {0}),
        # Two cores of two threads (siblings 0/2 and 1/3): one thread per core, the last reserved.
        ("x86_64", {c: (0, (0, c % 2)) for c in range(4)}, [2, 3], {3}),
        # Four cores of two threads: three compute, the last of them is reserved.
        ("x86_64", {c: (0, (0, c % 4)) for c in range(8)}, [4, 5, 6, 7], {7}),
        # Two NUMA nodes (0,1 and 2,3): one engine computes on the first.
        ("x86_64", {0: (0, (0, 0)), 1: (0, (0, 1)), 2: (1, (1, 0)), 3: (1, (1, 1))}, [0, 1], {1}),
        # Arm: every logical CPU.
        ("aarch64", {c: (0, (0, c % 2)) for c in range(4)}, [0, 1, 2, 3], {3}),
    ],
)
def test_auto_picks_what_vllms_own_binding_leaves_to_others(
    monkeypatch: pytest.MonkeyPatch,
    machine: str,
    topology: dict[int, tuple[int, tuple[int, int]]],
    computing: list[int],
    expected: set[int],
) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(affinity, "_topology", topology.__getitem__)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(topology))
    monkeypatch.setattr(affinity, "_has_gpu", lambda: False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert affinity.vllm_compute_cpus(sorted(topology)) == computing
    assert affinity.reserved_cpus("auto") == expected


def test_this_hosts_topology_is_read_for_each_cpu() -> None:
    # Where Linux says (sysfs), its package and core; elsewhere a core of the CPU's own.
    for cpu in os.sched_getaffinity(0):
        node, core = affinity._topology(cpu)
        topology = affinity.SYS_CPU / f"cpu{cpu}" / "topology"
        if (topology / "core_id").exists() and (topology / "physical_package_id").exists():
            said = (int((topology / "physical_package_id").read_text()), int((topology / "core_id").read_text()))
            assert core == said, cpu
        else:
            assert core == (-1, cpu), cpu
        assert node >= 0


@pytest.mark.parametrize("setting", [[7, 9], [1, 4]])
def test_listed_cpus_the_process_may_not_use_are_a_config_error_not_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch, setting: list[int]
) -> None:
    # Pinning to them failed quietly, while start-up said the processes were pinned.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    with pytest.raises(ConfigError, match=r"runtime.gateway_cpus: .* not all among the CPUs .* \[0, 1, 2, 3\]"):
        affinity.reserved_cpus(setting)


def test_an_empty_list_of_gateway_cpus_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="gateway_cpus"):
        parse_config({"runtime": {"gateway_cpus": []}, "models": [{"name": "e", "engine": "echo"}]})


def test_nothing_is_reserved_on_a_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(affinity, "_has_gpu", lambda: True)
    assert affinity.reserved_cpus("auto") is None


SLEEPER = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"


def threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def wait_for_children(root: int) -> list[int]:
    """The tree's processes, once its two children run (one named as vLLM's
    engine, the other with a second thread)."""
    deadline = time.monotonic() + 10
    while True:
        pids = affinity.process_tree(root)
        if len(pids) == 3 and any(affinity.is_engine(p) for p in pids) and any(len(threads(p)) == 2 for p in pids):
            return pids
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.02)


def test_every_thread_of_the_gateway_processes_is_pinned_and_the_engines_are_not() -> None:
    target = {min(os.sched_getaffinity(0))}
    tree = subprocess.Popen(
        ["bash", "-c", '"$PYTHON" -c "$SLEEPER" & (exec -a "$MARK" sleep 30) & wait'],
        env={**os.environ, "MARK": "VLLM::EngineCore", "PYTHON": sys.executable, "SLEEPER": SLEEPER},
        start_new_session=True,
    )
    try:
        pids = wait_for_children(tree.pid)
        engine = [p for p in pids if affinity.is_engine(p)]
        assert len(engine) == 1
        assert affinity.pin_gateway_processes(tree.pid, target) == 2
        pinned = {tid: os.sched_getaffinity(tid) == target for p in pids for tid in threads(p)}
        assert pinned == {tid: p not in engine for p in pids for tid in threads(p)}
        assert len(pinned) == 4  # bash, the engine, and both of the other process's threads
        assert affinity.pin_gateway_processes(tree.pid, target) == 0  # already pinned
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()


def test_what_a_model_started_is_left_alone_however_it_is_titled() -> None:
    # A process vLLM spawned is untitled at first, and a custom prefix titles
    # it otherwise: pinned, the engine's compute threads ran on the gateway's CPUs.
    target = {min(os.sched_getaffinity(0))}
    tree = subprocess.Popen(
        ["bash", "-c", '(exec -a "$MARK" bash -c "sleep 30 & wait") & wait'],
        env={**os.environ, "MARK": "ClassicalServer"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(pids := affinity.process_tree(tree.pid)) < 3:
            assert time.monotonic() < deadline, "the children did not start"
            time.sleep(0.02)
        model, started = pids[1], pids[2]
        assert affinity.is_engine(model) and not affinity.is_engine(started)
        before = os.sched_getaffinity(started)
        assert affinity.pin_gateway_processes(tree.pid, target) == 1  # bash alone
        assert os.sched_getaffinity(started) == before
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()


WIDEN = """
import os, threading, time
from gateway import affinity
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
for tid in os.listdir("/proc/self/task"):
    os.sched_setaffinity(int(tid), {min(os.sched_getaffinity(0))})
affinity.unpin_self()
print(sorted(len(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")))
"""


def widened(started: set[int] | None) -> list[int]:
    """The CPUs each thread of a pinned replica may run on after ``unpin_self``,
    in a cluster ``llm-gateway serve`` started on ``started`` (None: one it did not start)."""
    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k != affinity.STARTED_CPUS}
    if started is not None:
        env[affinity.STARTED_CPUS] = ",".join(map(str, sorted(started)))
    out = subprocess.run([sys.executable, "-c", WIDEN], capture_output=True, text=True, check=True, timeout=60,
                         cwd=root, env=env)
    return [int(n.strip("[],")) for n in out.stdout.split()]


def test_a_model_replica_unpins_every_thread_of_its_own() -> None:
    assert widened(ALL) == [len(ALL), len(ALL)]


@pytest.mark.skipif(len(ALL) < 2, reason="needs two CPUs to leave one out")
def test_a_replica_widens_only_to_the_cpus_the_gateway_was_started_on() -> None:
    # Under `taskset` or systemd's CPUAffinity, not onto CPUs the operator kept for other work.
    assert widened(ALL - {max(ALL)}) == [len(ALL) - 1, len(ALL) - 1]


def test_in_a_cluster_the_gateway_did_not_start_nothing_is_widened() -> None:
    assert widened(None) == [1, 1]


def test_the_local_cluster_tells_its_processes_the_cpus_serve_started_on() -> None:
    assert affinity.started_cpus() == {affinity.STARTED_CPUS: ",".join(map(str, sorted(os.sched_getaffinity(0))))}


TITLES = {
    "controller": "ray::ServeController.listen_for_change",
    "hub": "ray::ServeReplica:app:MetricsHub",
    "proxy": "ray::ProxyActor",
    "agent": "ray::DashboardAgent",
    "ingress": "ray::ServeReplica:app:GatewayIngress",
    "replica": "ray::ServeReplica:app:echo:LLMServer:echo",
    "idle": "ray::IDLE",
    "engine": "VLLM::EngineCore",
    "haproxy_manager": "ray::HAProxyManager",
}


def niceness(pid: int) -> set[int]:
    """The niceness of each of ``pid``'s threads."""
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_background_processes_are_lowered_and_the_request_path_is_not(tmp_path: Path) -> None:
    monitor = tmp_path / "ray" / "_private" / "log_monitor.py"
    monitor.parent.mkdir(parents=True)
    monitor.write_text(SLEEPER)
    script = " ".join(f'(exec -a "{title}" "$PY" -c "$CODE") &' for title in TITLES.values())
    tree = subprocess.Popen(
        ["bash", "-c", f'{script} "$PY" -u "$MONITOR" & wait'],
        env={**os.environ, "PY": sys.executable, "CODE": SLEEPER, "MONITOR": str(monitor)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # every child runs its two threads
            pids = {p: (Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(), len(os.listdir(f"/proc/{p}/task")))
                    for p in affinity.process_tree(tree.pid) if p != tree.pid}
            if len(pids) == len(TITLES) + 1 and all(threads == 2 for _, threads in pids.values()):
                break
            assert time.monotonic() < deadline, pids
            time.sleep(0.05)
        by_name = {next((k for k, t in TITLES.items() if t == title), "monitor"): pid for pid, (title, _) in pids.items()}
        base = os.getpriority(os.PRIO_PROCESS, 0)

        # Serve's Python proxy is on the request path unless HAProxy is the front door.
        assert affinity.lower_background(tree.pid, 19) == 5  # bash, controller, hub, agent, monitor
        lowered = {name for name, pid in by_name.items() if niceness(pid) == {19}}
        assert lowered == {"controller", "hub", "agent", "monitor"}
        assert all(niceness(pid) == {base} for name, pid in by_name.items() if name not in lowered)
        assert niceness(tree.pid) == {19}
        assert affinity.lower_background(tree.pid, 19, proxy=True) == 1  # only the proxy is new
        assert niceness(by_name["proxy"]) == {19}
        assert {name for name, pid in by_name.items() if niceness(pid) == {base}} == {
            "ingress", "replica", "idle", "engine", "haproxy_manager"
        }
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()



SPAWNED = "from multiprocessing.spawn import spawn_main"  # what an untitled vLLM process runs


def engine_tree(worker_cpus: set[int], root_cpus: set[int], titled: bool = True) -> subprocess.Popen[bytes]:
    """A replica's processes as vLLM's CPU backend leaves them, started on
    ``root_cpus``: an engine core with two threads, its worker bound to
    ``worker_cpus``, and a process of neither. Untitled: both run a spawn's
    command line, as vLLM's processes on hosts where their titles do not take."""
    core_title, worker_title = ("VLLM::EngineCore", "VLLM::Worker") if titled else ("python", "python")
    prefix = "" if titled else f"{SPAWNED}; "
    bind = f"{prefix}import os; os.sched_setaffinity(0, {sorted(worker_cpus)}); {SLEEPER}"
    start_worker = (
        f"{prefix}import subprocess, sys; "
        f"subprocess.Popen(['bash', '-c', 'exec -a {worker_title} \"$PY\" -c \"$BIND\"']); {SLEEPER}"
    )
    script = f'(exec -a {core_title} "$PY" -c "$CORE") & (exec -a other "$PY" -c "$CODE") & wait'
    return subprocess.Popen(
        ["taskset", "-c", ",".join(map(str, sorted(root_cpus))), "bash", "-c", script],
        env={**os.environ, "PY": sys.executable, "CODE": SLEEPER, "BIND": bind, "CORE": start_worker},
        start_new_session=True,
    )


def started(tree: subprocess.Popen[bytes], worker_cpus: set[int]) -> dict[str, int]:
    """The tree's processes (``core``, ``worker``, ``other``), once each runs two
    threads and the worker is bound."""
    deadline = time.monotonic() + 10
    while True:
        parents = affinity._parents()
        pids = [p for p in affinity.process_tree(tree.pid) if p != tree.pid]
        if len(pids) == 3 and all(len(affinity._threads(p)) == 2 for p in pids):
            (worker,) = [p for p in pids if parents[p] != tree.pid]
            if os.sched_getaffinity(worker) == worker_cpus:
                (core,) = [p for p in pids if p == parents[worker]]
                (other,) = set(pids) - {core, worker}
                return {"core": core, "worker": worker, "other": other}
        assert time.monotonic() < deadline, pids
        time.sleep(0.05)


def thread_cpus(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(tid) for tid in affinity._threads(pid)]


TWO = sorted(os.sched_getaffinity(0))[:2]  # the project's hosts have at least two CPUs


@pytest.mark.parametrize(
    ("worker_cpus", "gpu", "extra_cpu", "titled", "moved"),
    [
        ({TWO[0]}, False, False, True, True),  # one CPU left to everything else: the engine core joins its worker
        ({TWO[0]}, False, False, False, True),  # the same where vLLM's titles did not take
        (set(TWO), False, False, True, False),  # no CPU left (vLLM bound nothing): where it is
        ({TWO[0]}, False, True, True, False),  # two CPUs left: vLLM's reservation holds the engine core too
        ({TWO[0]}, True, False, True, False),  # a GPU host: the engine core drives the GPU, where vLLM put it
    ],
)
def test_the_engine_core_joins_its_workers_only_where_vllm_left_one_cpu(
    monkeypatch: pytest.MonkeyPatch, worker_cpus: set[int], gpu: bool, extra_cpu: bool, titled: bool, moved: bool
) -> None:
    monkeypatch.setattr(affinity, "_has_gpu", lambda: gpu)
    tree = engine_tree(worker_cpus, set(TWO), titled)
    try:
        pids = started(tree, worker_cpus)
        if extra_cpu:  # the replica as if it had one CPU more than this host gives the test
            real = affinity._cpus
            monkeypatch.setattr(affinity, "_cpus", lambda pid: real(pid) | ({-1} if pid == tree.pid else set()))
        placed = affinity.place_engine_core(tree.pid)
        monkeypatch.undo()
        assert placed == (worker_cpus if moved else None)
        expected = worker_cpus if moved else set(TWO)
        assert thread_cpus(pids["core"]) == [expected, expected]
        assert thread_cpus(pids["other"]) == [set(TWO), set(TWO)]
        assert thread_cpus(pids["worker"]) == [worker_cpus, worker_cpus]
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()


def test_the_engine_core_moves_beside_its_workers_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model replica moves its engine core by load: beside its workers and
    back where vLLM left it, every thread each time, nothing else touched."""
    monkeypatch.setattr(affinity, "_has_gpu", lambda: False)
    worker_cpus = {TWO[0]}
    tree = engine_tree(worker_cpus, set(TWO))
    try:
        pids = started(tree, worker_cpus)
        placement = affinity.engine_core_placement(tree.pid)
        assert placement is not None
        assert placement.workers == worker_cpus
        assert thread_cpus(pids["core"]) == [set(TWO), set(TWO)]  # finding it moves nothing
        for _ in range(2):
            placement.beside_workers()
            assert thread_cpus(pids["core"]) == [worker_cpus, worker_cpus]
            placement.where_vllm_left()
            assert thread_cpus(pids["core"]) == [set(TWO), set(TWO)]
        assert thread_cpus(pids["other"]) == [set(TWO), set(TWO)]
        assert thread_cpus(pids["worker"]) == [worker_cpus, worker_cpus]
        os.kill(pids["core"], 9)  # an engine core that exited is skipped
        placement.beside_workers()
        placement.where_vllm_left()
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()


def test_a_gpu_is_seen_by_any_of_its_device_files(tmp_path: Path) -> None:
    assert not affinity._has_gpu(tmp_path)
    (tmp_path / "nvidiactl").touch()
    (tmp_path / "nvidia-uvm").touch()
    assert not affinity._has_gpu(tmp_path)  # the driver's files alone: no GPU given to this host
    (tmp_path / "nvidia3").touch()  # a container given the node's fourth GPU only
    assert affinity._has_gpu(tmp_path)
    assert not affinity._has_gpu(tmp_path / "missing")
