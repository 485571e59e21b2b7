"""gateway/http/access_log.py: what a line says of a stream, and a log that cannot be written."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from gateway.http.access_log import AccessLog
from gateway.metrics.recorder import RequestRecord


def test_a_stream_line_says_whether_the_replica_wrote_it_itself(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), replica="r1")
    for stream, handed_over in [(False, False), (True, False), (True, True)]:
        record = RequestRecord("id", "/v1/chat/completions", 0.0, stream=stream, handed_over=handed_over)
        log.request(record, "POST", 200, 0.1, 0.001)
    log.flush()
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    assert [(line["stream"], line.get("handoff", "absent")) for line in lines] == [
        (False, "absent"), (True, False), (True, True)
    ]


def test_a_write_that_fails_drops_its_lines_with_one_warning_and_the_log_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: serving goes on (the replica's metrics reporter flushes
    the log), each failure is not logged again, and a line a failed write
    cut short is ended before the next."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path), replica="r1")
    written = os.write
    room = [40]  # bytes the disk takes before it is full

    def full_disk(fd: int, data: bytes) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = written(fd, data[: room[0]])
        room[0] -= taken
        return taken

    monkeypatch.setattr(os, "write", full_disk)
    record = RequestRecord("id", "/v1/chat/completions", 0.0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            log.request(record, "POST", 200, 0.1, 0.001)
            log.flush()  # raises nothing
        room[0] = 1  # room for the end of the cut line, and no more
        log.request(record, "POST", 200, 0.1, 0.001)
        log.flush()
        room[0] = 10**6
        log.request(record, "POST", 201, 0.1, 0.001)
        log.flush()
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "access log: a write failed ([Errno 28] No space left on device)", "access log: writing works again"
    ]
    *cut, last = path.read_text().split("\n")[:-1]
    assert len(cut) == 1 and len(cut[0]) == 40  # the first line, cut short, and ended once
    assert json.loads(last)["status"] == 201
