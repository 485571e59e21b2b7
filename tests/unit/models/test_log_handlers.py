"""models/log_handlers.py: Serve's log handlers stay open through vLLM's logging set-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Run in a process of its own: set up as a Serve replica's logger is (a buffer
# in front of the replica's log file), then vLLM's logging as its engine start does.
_SCRIPT = """
import contextlib, logging, logging.handlers, sys
from models.log_handlers import handlers_kept
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging

path = sys.argv[2]
buffered = logging.handlers.MemoryHandler(100, target=logging.FileHandler(path))
serve = logging.getLogger("ray.serve")
serve.addHandler(buffered)
serve.setLevel(logging.INFO)
with handlers_kept() if sys.argv[1] == "kept" else contextlib.nullcontext():
    configure_logging(LoggingConfig())
serve.info("a line after the engine started")
buffered.flush()
for call in range(250):
    serve.info("a call through a handle")
print("held", len(buffered.buffer))
print("vllm handlers", len(logging.getLogger("vllm").handlers))
print("target", buffered.target is not None)
"""


def _run(mode: str, log: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, str(log)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("mode", ["kept", "bare"])
def test_serves_log_file_gets_lines_after_vllm_sets_up_its_logging_only_when_kept(mode: str, tmp_path: Path) -> None:
    log = tmp_path / "replica.log"
    out = _run(mode, log)
    assert "vllm handlers 1" in out  # vLLM's own logging is set up either way
    if mode == "kept":
        assert "target True" in out
        assert "a line after the engine started" in log.read_text()
        assert int(out.split("held ")[1].split()[0]) < 100  # written out each 100 lines
    else:  # what the guard is for: the installed vLLM closes Serve's handlers
        assert "target False" in out
        assert log.read_text() == ""
        assert "held 251" in out  # and every line stays in memory


def test_the_guard_nests_and_puts_dictconfig_back() -> None:
    import logging.config

    from models.log_handlers import handlers_kept

    original = logging.config._clearExistingHandlers  # type: ignore[attr-defined]
    with handlers_kept():
        with handlers_kept():
            assert logging.config._clearExistingHandlers is not original  # type: ignore[attr-defined]
        assert logging.config._clearExistingHandlers is not original  # type: ignore[attr-defined]
    assert logging.config._clearExistingHandlers is original  # type: ignore[attr-defined]
