"""The gateway's own log lines from inside a Serve replica, where its operator sees them.

A Serve replica is a Ray worker whose root logger has no handler and sits at
WARNING, and Serve sets up only its own ``ray.serve`` logger (which does not
propagate). So a line the gateway's modules logged at INFO in a replica (a
model ready and the port its streams use, where vLLM's engine core runs, the
ingress's routing table) went nowhere, and a warning went, bare (no level,
no logger), through Python's last-resort handler to ``sys.stderr``, which
Serve's throughput-optimized mode (the gateway's default) turns into lines of
the replica's log file, written a thousand at a time. ``to_stderr``, called
as each replica starts, writes the ``gateway`` and ``models`` loggers' lines
of INFO and above to the process's own stderr, where vLLM writes its lines:
``llm-gateway serve`` prints them with the replica's name, and Ray keeps
them in the worker's ``.err`` file.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGERS = ("gateway", "models")
FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


class _ToStderr(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter(FORMAT))


def to_stderr(in_replica: bool | None = None, stream: TextIO | None = None) -> None:
    """In a Serve replica (``in_replica``: None asks Serve), the project's
    loggers write INFO and above to ``stream`` (the process's own stderr by
    default); nothing elsewhere, and nothing twice when called again."""
    if in_replica is None:
        from ray.serve.context import _get_internal_replica_context

        in_replica = _get_internal_replica_context() is not None
    if not in_replica:
        return
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(handler, _ToStderr) for handler in logger.handlers):
            logger.addHandler(_ToStderr(stream or sys.__stderr__ or sys.stderr))
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
