"""models/llm/engine_reaper.py: an engine's processes end with their replica, even one killed with no one to
end its children (Ray's raylet gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.llm.engine_reaper import EngineReaper, start_time

ROOT = Path(__file__).resolve().parents[4]

# A stand-in replica: starts an "engine" process of its own, then (when asked) a reaper for it, says
# both pids and waits to be killed.
_REPLICA = """
import subprocess, sys, time
from models.llm.engine_reaper import reaper_for_children
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
reaper = reaper_for_children() if sys.argv[1] == "reaped" else None
print(engine.pid, reaper.pid if reaper else 0, flush=True)
time.sleep(600)
"""


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if start_time(pid) is None or _zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.parametrize("mode", ["reaped", "bare"])
def test_an_engine_process_ends_when_its_replica_is_killed(mode: str) -> None:
    replica = subprocess.Popen(
        [sys.executable, "-c", _REPLICA, mode], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert replica.stdout is not None
        engine, _ = (int(n) for n in replica.stdout.readline().split())
        os.kill(replica.pid, signal.SIGKILL)  # no stop, no atexit: as when Ray's daemons are gone
        replica.wait()
        if mode == "reaped":
            assert _gone(engine, 10), "the engine process outlived its replica"
        else:  # what the reaper is for: the orphan lives on
            assert not _gone(engine, 1)
    finally:
        replica.kill()
        replica.wait()
        if replica.stdout is not None:
            replica.stdout.close()
        if "engine" in locals() and start_time(engine) is not None:
            os.kill(engine, signal.SIGKILL)


# A stand-in replica whose "engine" (a spawned process, as vLLM's engine core is) holds a shared-memory
# segment, as vLLM's queues do; Python's resource tracker is then the replica's child too.
_SHM_REPLICA = """
import multiprocessing as mp, os, time
from multiprocessing import shared_memory

def engine(conn):
    segment = shared_memory.SharedMemory(create=True, size=4096)
    conn.send(segment.name)
    time.sleep(600)

if __name__ == "__main__":
    from models.llm.engine_reaper import is_resource_tracker, descendants, reaper_for_children
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=engine, args=(theirs,))
    process.start()
    name = ours.recv()
    reaper = reaper_for_children()
    tracker = next(pid for pid in descendants(os.getpid()) if is_resource_tracker(pid))
    print(process.pid, name, tracker, reaper.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("killed", ["replica", "group"])
def test_a_killed_engines_shared_memory_is_unlinked(tmp_path: Path, killed: str) -> None:
    """``replica``: the replica's process alone (Python's resource tracker
    lives on, and unlinks); ``group``: its whole process group, the tracker
    with it, as Ray's raylet kills a worker's."""
    script = tmp_path / "replica.py"
    script.write_text(_SHM_REPLICA)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replica = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )
    engine, segment = 0, None
    try:
        assert replica.stdout is not None
        fields = replica.stdout.readline().split()
        engine, segment, tracker = int(fields[0]), Path("/dev/shm") / fields[1].lstrip("/"), int(fields[2])
        watcher = int(fields[3])
        assert segment.exists()
        # Out of the replica's process group, in its session (scheduled with it: autogroup).
        assert os.getpgid(watcher) != os.getpgid(replica.pid) and os.getsid(watcher) == os.getsid(replica.pid)
        if killed == "group":
            os.killpg(replica.pid, signal.SIGKILL)
        else:
            os.kill(replica.pid, signal.SIGKILL)
        replica.wait()
        assert _gone(engine, 10), "the engine process outlived its replica"
        assert _gone(tracker, 10), "the resource tracker outlived the processes it tracks"
        deadline = time.monotonic() + 10
        while segment.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not segment.exists(), f"{segment} was left behind"
    finally:
        replica.kill()
        replica.wait()
        if replica.stdout is not None:
            replica.stdout.close()
        if engine and start_time(engine) is not None:
            os.kill(engine, signal.SIGKILL)
        if segment is not None:
            segment.unlink(missing_ok=True)


def test_a_process_whose_pid_was_reused_is_left_alone() -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        from models.llm import engine_reaper

        # As if the pid had been the engine's once: the watcher knows it by another start time.
        started = start_time(bystander.pid)
        assert started is not None
        watcher = subprocess.Popen(
            [sys.executable, "-S", "-c", engine_reaper.WATCHER, f"{bystander.pid}:{started + 1}"],
            stdin=subprocess.PIPE,
        )
        assert watcher.stdin is not None
        watcher.stdin.close()
        assert watcher.wait(10) == 0
        assert bystander.poll() is None
        EngineReaper([bystander.pid]).close()  # the same pid and start time: killed
        assert bystander.wait(10) == -signal.SIGKILL
    finally:
        bystander.kill()
        bystander.wait()


def test_only_pythons_shared_memory_segments_are_the_reapers_to_unlink() -> None:
    """Not another file a process maps from /dev/shm (Ray's object store, say: it
    unlinks its own, but another library's may be shared beyond the engine)."""
    import mmap
    import uuid
    from multiprocessing import shared_memory

    from models.llm.engine_reaper import shared_memory_of

    segment = shared_memory.SharedMemory(create=True, size=4096)
    other = Path("/dev/shm") / f"llmgw-test-{uuid.uuid4().hex}"
    other.write_bytes(b"\0" * 4096)
    try:
        with other.open("r+b") as f, mmap.mmap(f.fileno(), 4096) as mapped:
            found = shared_memory_of([os.getpid()])
            assert f"/dev/shm/{segment.name.lstrip('/')}" in found
            assert str(other) not in found
            mapped[0] = 1
    finally:
        other.unlink(missing_ok=True)
        segment.close()
        segment.unlink()
