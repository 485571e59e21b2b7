"""gateway/http/access_log.py: what a line says of a stream."""

from __future__ import annotations

import json
from pathlib import Path

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
