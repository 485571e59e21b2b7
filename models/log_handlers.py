"""Serve's logging in a replica survives the libraries the replica loads.

vLLM sets up its loggers when its engine starts, with
``logging.config.dictConfig``, which first closes every handler in the
process, Serve's own among them. Serve's buffer for the replica's log
file then has no file: the file gets nothing more, what Serve logs (a line
per call through a handle) stays in the buffer for good, and the next time Serve
asks the replica where it logs (``is_allocated``, which a restarted Serve
controller calls as it recovers its replicas) the replica fails, and the
controller stops it. Every vLLM engine was restarted after any restart of
the controller (40 s of 503s for the tiny test model; minutes for a large one
on GPUs).

Within ``handlers_kept()`` a ``dictConfig`` call sets up the loggers it names
and leaves every other handler of the process open.
"""

from __future__ import annotations

import contextlib
import logging.config
from collections.abc import Iterator

_CLEAR = "_clearExistingHandlers"  # what dictConfig calls first (CPython 2.7 to 3.13)
_depth = 0
_clear_existing = None


def _keep_existing() -> None:
    """Stands in for dictConfig's first step: nothing is closed."""


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Keeps the process's logging handlers open through ``dictConfig`` calls
    made inside it (nestable; an engine start awaited inside it is covered
    throughout)."""
    global _depth, _clear_existing
    if _depth == 0:
        _clear_existing = getattr(logging.config, _CLEAR, None)
        if _clear_existing is not None:
            setattr(logging.config, _CLEAR, _keep_existing)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _clear_existing is not None:
            setattr(logging.config, _CLEAR, _clear_existing)
            _clear_existing = None
