"""Where vLLM's engine core runs on a CPU host, by how many requests generate.

On a host where vLLM binds its workers to all CPUs but one
(``gateway.affinity.engine_core_placement``), the engine core computes best
beside its workers once several requests generate: the CPU left over then
serves every stream's frontend work, and a scheduler queued behind it stalls
each step. With a single request that CPU is mostly idle, and the engine core
is faster where vLLM left it, free to run its I/O beside the workers' next
step (on 2 vCPUs, one gateway switched between the two round after round: one
stream 453-535 tok/s there against 382-476 beside its workers, faster in each
of six rounds; from two streams on the placements trade places round by round,
and from four on beside the workers wins).

``engine_core_cpus`` chooses: ``auto`` moves it as the count crosses
``BESIDE_WORKERS_AT``; ``workers`` keeps it beside its workers; ``vllm``
never moves it.
"""

from __future__ import annotations

from typing import Literal, Protocol

# From this many generating requests on, the engine core runs beside its workers.
BESIDE_WORKERS_AT = 2


class Placement(Protocol):
    def beside_workers(self) -> None: ...

    def where_vllm_left(self) -> None: ...


class CorePlacer:
    """Counts the requests generating in one engine and moves its engine core
    when the count crosses ``BESIDE_WORKERS_AT`` (``auto``), or once
    (``workers``). ``started``/``ended`` run on the replica's event loop: a
    move is a few system calls, made only when the count crosses (a thread
    that ended, or an engine core that exited, is skipped: the replica's
    health check reports the latter)."""

    def __init__(self, placement: Placement, mode: Literal["auto", "workers"]) -> None:
        self._placement = placement
        self._threshold = BESIDE_WORKERS_AT if mode == "auto" else 0
        self._generating = 0
        self._beside = False
        self._settle()

    @property
    def generating(self) -> int:
        return self._generating

    def started(self) -> None:
        self._generating += 1
        self._settle()

    def ended(self) -> None:
        self._generating -= 1
        self._settle()

    def _settle(self) -> None:
        beside = self._generating >= self._threshold
        if beside == self._beside:
            return
        self._beside = beside
        if beside:
            self._placement.beside_workers()
        else:
            self._placement.where_vllm_left()
