"""Metric families held in plain dicts: cheap to record, to copy and to merge.

Every process that records (each ingress replica) keeps one
``MetricsRegistry``. Its ``snapshot()`` is plain data that crosses Ray;
``merge`` adds snapshots from many processes together (counters, gauges and
histogram buckets all sum) and ``render`` writes the Prometheus text format.
Pure: no Ray, no HTTP, no prometheus_client.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Labels = tuple[str, ...]
# Per family name, per label values: a number, or a histogram's
# (per-bucket counts with +Inf last, sum of observations).
Snapshot = dict[str, dict[Labels, "float | tuple[list[float], float]"]]

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name as exported, kind, help text, label names, buckets."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


class Counter:
    def __init__(self, family: Family) -> None:
        self.family = family
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount


class Gauge(Counter):
    def dec(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) - amount


class Histogram:
    def __init__(self, family: Family) -> None:
        self.family = family
        self.values: dict[Labels, tuple[list[float], list[float]]] = {}

    def observe(self, labels: Labels, value: float, count: int = 1) -> None:
        """Adds ``count`` observations of ``value`` (``le`` bounds are inclusive)."""
        entry = self._entry(labels)
        entry[0][bisect_left(self.family.buckets, value)] += count
        entry[1][0] += value * count

    def merge(self, labels: Labels, counts: Sequence[int], total: float) -> None:
        """Adds observations bucketed elsewhere: ``counts`` per bucket (``+Inf``
        last, as this family's buckets) and their sum ``total``."""
        if len(counts) != len(self.family.buckets) + 1:
            raise ValueError(
                f"{self.family.name}: {len(counts)} bucket counts for "
                f"{len(self.family.buckets) + 1} buckets"
            )
        entry = self._entry(labels)
        buckets = entry[0]
        for index, count in enumerate(counts):
            buckets[index] += count
        entry[1][0] += total

    def _entry(self, labels: Labels) -> tuple[list[float], list[float]]:
        entry = self.values.get(labels)
        if entry is None:
            entry = self.values[labels] = ([0.0] * (len(self.family.buckets) + 1), [0.0])
        return entry


class MetricsRegistry:
    """The families one process records, by name."""

    def __init__(self, families: Iterable[Family]) -> None:
        self.families = {f.name: f for f in families}
        self._metrics: dict[str, Counter | Histogram] = {
            f.name: Histogram(f) if f.kind == "histogram" else (Gauge(f) if f.kind == "gauge" else Counter(f))
            for f in self.families.values()
        }

    def counter(self, family: Family) -> Counter:
        metric = self._metrics[family.name]
        assert isinstance(metric, Counter) and family.kind == "counter"
        return metric

    def gauge(self, family: Family) -> Gauge:
        metric = self._metrics[family.name]
        assert isinstance(metric, Gauge)
        return metric

    def histogram(self, family: Family) -> Histogram:
        metric = self._metrics[family.name]
        assert isinstance(metric, Histogram)
        return metric

    def snapshot(self) -> Snapshot:
        """A copy of every value, safe to send while recording goes on."""
        snapshot: Snapshot = {}
        for name, metric in self._metrics.items():
            if isinstance(metric, Histogram):
                snapshot[name] = {k: (list(c), s[0]) for k, (c, s) in metric.values.items()}
            else:
                snapshot[name] = dict(metric.values)
        return snapshot


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of ``snapshots``, label set by label set."""
    total: Snapshot = {}
    for snapshot in snapshots:
        for name, series in snapshot.items():
            into = total.setdefault(name, {})
            for labels, value in series.items():
                held = into.get(labels)
                if held is None:
                    into[labels] = (list(value[0]), value[1]) if isinstance(value, tuple) else value
                elif isinstance(value, tuple):
                    assert isinstance(held, tuple)
                    into[labels] = ([a + b for a, b in zip(held[0], value[0])], held[1] + value[1])
                else:
                    assert not isinstance(held, tuple)
                    into[labels] = held + value
    return total


def without_gauges(snapshot: Snapshot, families: Iterable[Family]) -> Snapshot:
    """``snapshot`` less its gauges: what a process that went away still contributes."""
    gauges = {f.name for f in families if f.kind == "gauge"}
    return {name: series for name, series in snapshot.items() if name not in gauges}


def render(families: Sequence[Family], snapshot: Snapshot) -> str:
    """Prometheus text exposition (format 0.0.4) of ``snapshot``, in ``families`` order."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        series = snapshot.get(family.name, {})
        for labels in sorted(series):
            value = series[labels]
            pairs = list(zip(family.labels, labels))
            if isinstance(value, tuple):
                lines.extend(_histogram_lines(family, pairs, value))
            else:
                lines.append(f"{family.name}{_labels(pairs)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _histogram_lines(
    family: Family, pairs: list[tuple[str, str]], value: tuple[list[float], float]
) -> list[str]:
    counts, total = value
    lines = []
    running = 0.0
    for bound, count in zip((*family.buckets, math.inf), counts):
        running += count
        le = "+Inf" if bound == math.inf else repr(float(bound))
        lines.append(f"{family.name}_bucket{_labels([*pairs, ('le', le)])} {_number(running)}")
    lines.append(f"{family.name}_sum{_labels(pairs)} {_number(total)}")
    lines.append(f"{family.name}_count{_labels(pairs)} {_number(running)}")
    return lines


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs) + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
