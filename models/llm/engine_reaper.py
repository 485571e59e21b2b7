"""An engine's processes end with their replica, however the replica ends.

vLLM runs its engine core (and, for tensor parallelism, its workers) in
processes of their own, children of the model replica. When the replica
stops, vLLM stops them; when the replica is killed, Ray's raylet kills its
children. When the raylet goes too (Ray's GCS died, or its node's daemons
were killed), nothing does: the engine processes went on busy-waiting for a
frontend that was gone, holding their CPU time and, on GPUs, their memory, so
a gateway started again could not load its models.

``EngineReaper`` starts a small watcher process holding the read end of a
pipe whose write end only the replica holds. The pipe closes when the
replica's process ends, by whatever means; the watcher then kills the
processes it was given, each only if it is still the process it was (its
start time in ``/proc/<pid>/stat`` unchanged), and exits. It waits in a
blocking read: no CPU until then.

vLLM's shared-memory queues (``/dev/shm/psm_*``) are unlinked by whoever
made them when the engine stops, and else by Python's resource tracker once
every process holding its pipe is gone; a replica killed by Ray takes the
tracker with it (Ray kills a worker's whole process group), and each crash
left its queues in ``/dev/shm`` for good. So the watcher also unlinks the
segments (``psm_*``) its processes had mapped when it started, after
killing them, and runs in a process group of its own, out of reach of that
group kill; the tracker is left out of its targets, to end by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

_START_FIELD = 19  # starttime (field 22 of /proc/<pid>/stat), counted after the command name

# Run as ``python -S -c``: nothing imported beyond ``os`` and ``sys``.
WATCHER = """
import os, sys
targets = [tuple(int(n) for n in t.split(":")) for t in sys.argv[1:] if not t.startswith("/")]
files = [t for t in sys.argv[1:] if t.startswith("/dev/shm/psm_")]
try:
    while os.read(0, 4096):
        pass
except OSError:
    pass
for pid, start in targets:
    try:
        with open("/proc/" + str(pid) + "/stat") as f:
            stat = f.read()
        if int(stat[stat.rindex(")") + 2:].split()[START_FIELD]) == start:
            os.kill(pid, 9)
    except (OSError, ValueError):
        pass
for path in files:
    try:
        os.unlink(path)
    except OSError:
        pass
""".replace("START_FIELD", str(_START_FIELD))


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[_START_FIELD])


# A process group of its own, in the replica's session: Linux schedules a
# session as one group (autogroup), and the watcher keeps the replica's.
_OWN_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


class EngineReaper:
    """Kills ``pids`` once this process has ended (or ``close`` is called)."""

    def __init__(self, pids: Iterable[int]) -> None:
        pids = list(pids)
        targets = [f"{pid}:{start}" for pid in pids if (start := start_time(pid)) is not None]
        self._watcher = subprocess.Popen(
            [sys.executable, "-S", "-c", WATCHER, *targets, *shared_memory_of(pids)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
            **_OWN_GROUP,  # not killed with the replica's process group: see above
        )

    @property
    def pid(self) -> int:
        return self._watcher.pid

    def close(self) -> None:
        """Ends the watch now: the processes still there are killed."""
        if self._watcher.stdin is not None:
            self._watcher.stdin.close()
        self._watcher.wait()


# Python's ``multiprocessing.shared_memory`` segments (vLLM's queues), by the
# name it gives them; not other files under /dev/shm a process may map.
SHARED_MEMORY = "/dev/shm/psm_"


def shared_memory_of(pids: Iterable[int]) -> list[str]:
    """The shared-memory segments ``pids`` map now (``SHARED_MEMORY``)."""
    files: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        for line in maps.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith(SHARED_MEMORY) and not fields[5].endswith(" (deleted)"):
                files.add(fields[5])
    return sorted(files)


def descendants(root: int) -> list[int]:
    """Every process descended from ``root`` now (not ``root`` itself)."""
    from gateway.affinity import process_tree

    return [pid for pid in process_tree(root) if pid != root]


def is_resource_tracker(pid: int) -> bool:
    """Whether ``pid`` runs Python's multiprocessing resource tracker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def reaper_for_children() -> EngineReaper | None:
    """A reaper for every process this one has started so far but Python's
    resource tracker (None when there are none: an engine without processes
    of its own)."""
    pids = [pid for pid in descendants(os.getpid()) if not is_resource_tracker(pid)]
    return EngineReaper(pids) if pids else None
