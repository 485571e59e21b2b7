"""gateway/replica_logs.py: the project's INFO lines from a replica reach its stderr."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from gateway import replica_logs


@pytest.fixture
def restored() -> Iterator[None]:
    """The project's loggers as they were before the test."""
    loggers = [logging.getLogger(name) for name in replica_logs.LOGGERS]
    before = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    yield
    for logger, level, handlers in before:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_in_a_replica_info_and_above_are_written_with_level_and_logger(restored: None) -> None:
    stream = io.StringIO()
    replica_logs.to_stderr(in_replica=True, stream=stream)
    replica_logs.to_stderr(in_replica=True, stream=stream)  # a second call adds nothing
    logging.getLogger("models.llm.server").info("tiny-chat-v1 ready (streams on %s:%d)", "127.0.0.1", 4321)
    logging.getLogger("gateway.http.state").warning("a warning")
    logging.getLogger("gateway.http.state").debug("not this")
    logging.getLogger("vllm.somewhere").info("nor another library's")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("INFO ")
    assert lines[0].endswith(" models.llm.server: tiny-chat-v1 ready (streams on 127.0.0.1:4321)")
    assert lines[1].startswith("WARNING ") and lines[1].endswith(" gateway.http.state: a warning")


def test_outside_a_replica_nothing_changes(restored: None) -> None:
    handlers = {name: list(logging.getLogger(name).handlers) for name in replica_logs.LOGGERS}
    replica_logs.to_stderr()  # this test process is no Serve replica
    replica_logs.to_stderr(in_replica=False, stream=io.StringIO())
    assert {name: list(logging.getLogger(name).handlers) for name in replica_logs.LOGGERS} == handlers
