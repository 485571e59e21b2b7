"""Where vLLM's engine core runs on a CPU host, by which place makes tokens faster.

On a host where vLLM binds its workers to all CPUs but one
(``gateway.affinity.engine_core_placement``), the engine core can run beside
its workers (they then take turns) or where vLLM left it, free to use the CPU
left over, which also serves every stream's frontend work and the gateway's
own processes. Which is faster depends on the load and on the host: on 2
vCPUs one request was faster where vLLM left it (six rounds of six); with
more, on an AMD EPYC host beside the workers won from 3-4 streams on, on an
Intel Xeon host only from 16-32 (8 streams: 0.88-0.91x of vLLM's placement
with the engine core beside them). No fixed count of requests suits both.

``engine_core_cpus`` chooses: ``auto`` measures. The engine's output tokens
per second are sampled in windows of ``WINDOW_S``; each window is filed under
its load (the time-weighted mean of generating requests, in powers of two)
and the place it ran in. A load with fewer than ``SAMPLES`` windows in either
place alternates between them; after that it runs in the place with the
higher mean of its last ``SAMPLES`` windows, and tries the other one window
in ``PROBE_EVERY``, so that a change (the host's other work, prompt lengths)
is found. Below ``SINGLE`` requests on average, and whenever none generates,
the engine core stays where vLLM left it; a burst after such a lull goes
beside the workers as soon as its count of generating requests reaches a
load measured faster there (rounds of 2-3 s at 32 streams lost 3-10 % to a
first window spent where vLLM left it). ``workers`` keeps it beside its
workers; ``vllm`` never moves it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

WINDOW_S = 0.5
SAMPLES = 4
PROBE_EVERY = 8
# Below this many generating requests on average the engine core is left where vLLM put it.
SINGLE = 1.5

BESIDE, LEFT = True, False

logger = logging.getLogger(__name__)


class Placement(Protocol):
    def beside_workers(self) -> None: ...

    def where_vllm_left(self) -> None: ...


class Load:
    """The windows measured at one load: tokens/s by place, and how many
    windows it has run since both places had ``SAMPLES``."""

    def __init__(self) -> None:
        self.rates: dict[bool, deque[float]] = {BESIDE: deque(maxlen=SAMPLES), LEFT: deque(maxlen=SAMPLES)}
        self.settled = 0
        self.winner: bool | None = None

    def next_place(self, current: bool) -> bool:
        """Where the next window at this load runs."""
        beside, left = len(self.rates[BESIDE]), len(self.rates[LEFT])
        if beside < SAMPLES or left < SAMPLES:
            return not current if beside == left else beside < left
        self.settled += 1
        self.winner = self.mean(BESIDE) > self.mean(LEFT)
        return self.winner if self.settled % PROBE_EVERY else not self.winner

    def mean(self, place: bool) -> float:
        rates = self.rates[place]
        return sum(rates) / len(rates)


class CorePlacer:
    """Moves one engine's engine core by what ``started``, ``produced`` and
    ``ended`` tell it (each request generating, its tokens as they pass, its
    end). All run on the replica's event loop and cost O(1): a move is a few
    system calls, made only at a window's end or when the last request ends
    (a thread that ended, or an engine core that exited, is skipped: the
    replica's health check reports the latter)."""

    def __init__(
        self, placement: Placement, mode: Literal["auto", "workers"], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._placement = placement
        self._measure = mode == "auto"
        self._clock = clock
        self._generating = 0
        self._beside = False
        self._loads: dict[int, Load] = {}
        self._opened = self._since = self._area = 0.0
        self._tokens = 0
        self._decided = False  # whether the place was measured for the load, not taken for a lull's
        if not self._measure:
            self._move(BESIDE)

    @property
    def generating(self) -> int:
        return self._generating

    @property
    def beside(self) -> bool:
        """Whether the engine core runs beside its workers now."""
        return self._beside

    def started(self) -> None:
        now = self._clock()
        if self._generating == 0:
            self._open(now)
        else:
            self._accrue(now)
        self._generating += 1
        if self._measure and not self._decided and self._generating >= SINGLE:
            # A burst after a lull: its load's winner at once, not after a window where vLLM left it.
            load = self._loads.get(round(math.log2(self._generating)))
            if load is not None and load.winner:
                self._move(BESIDE)
                self._decided = True
                self._open(now)

    def produced(self, tokens: int) -> None:
        self._tokens += tokens
        if self._measure and (now := self._clock()) - self._opened >= WINDOW_S:
            self._close(now)

    def ended(self) -> None:
        self._accrue(self._clock())
        self._generating -= 1
        if self._generating == 0 and self._measure:
            self._move(LEFT)  # an idle engine's next request may well be alone
            self._decided = False

    def _open(self, now: float) -> None:
        self._opened = self._since = now
        self._area = 0.0
        self._tokens = 0

    def _accrue(self, now: float) -> None:
        self._area += self._generating * (now - self._since)
        self._since = now

    def _close(self, now: float) -> None:
        self._accrue(now)
        elapsed = now - self._opened
        mean = self._area / elapsed
        self._decided = mean >= SINGLE
        if not self._decided:
            place = LEFT
        else:
            level = round(math.log2(mean))
            load = self._loads.setdefault(level, Load())
            load.rates[self._beside].append(self._tokens / elapsed)
            winner = load.winner
            place = load.next_place(self._beside)
            if load.winner != winner:
                _report(level, load, first=winner is None)
        self._move(place)
        self._open(now)

    def _move(self, beside: bool) -> None:
        if beside == self._beside:
            return
        self._beside = beside
        if beside:
            self._placement.beside_workers()
        else:
            self._placement.where_vllm_left()


def _report(level: int, load: Load, first: bool) -> None:
    """Logs where the engine core runs at ``level``: at INFO when first
    decided, at DEBUG when a later measurement changes it."""
    place = "beside its workers" if load.winner else "where vLLM left it"
    logger.log(
        logging.INFO if first else logging.DEBUG,
        "with about %d requests generating, vLLM's engine core runs %s (tokens/s beside its workers %.0f, "
        "where vLLM left it %.0f: means of the last %d windows of %g s)",
        2**level, place, load.mean(BESIDE), load.mean(LEFT), SAMPLES, WINDOW_S,
    )
