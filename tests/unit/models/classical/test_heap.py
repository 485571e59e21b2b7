"""models/classical/heap.py: the heap is trimmed when resident memory grows, checked at most once per interval."""

from __future__ import annotations

from models.classical.heap import HeapTrimmer, malloc_trim, resident_bytes


def test_trims_only_on_growth_and_checks_at_most_once_per_interval() -> None:
    now, rss = [100.0], [1000]
    trims: list[int] = []
    checks: list[float] = []

    def read() -> int:
        checks.append(now[0])
        return rss[0]

    def trim(pad: int) -> int:
        trims.append(pad)
        rss[0] = 1020  # most of it given back
        return 1

    trimmer = HeapTrimmer(every_s=1.0, growth=0.05, trim=trim, rss=read, clock=lambda: now[0])
    now[0] += 1.0
    trimmer.after_batch()  # the first check sets the level: 1000
    rss[0] = 1040
    for _ in range(3):
        now[0] += 0.3
        trimmer.after_batch()  # within the interval: not even looked at
    assert len(checks) == 1 and trims == []
    now[0] += 0.2
    trimmer.after_batch()  # +4 %: left alone
    assert trims == []
    rss[0] = 1060
    now[0] += 1.0
    trimmer.after_batch()  # +6 %: trimmed, and 1020 is the new level
    assert trims == [0]
    rss[0] = 1060
    now[0] += 1.0
    trimmer.after_batch()  # +3.9 % over 1020: left alone
    assert trims == [0]


def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was given back; 0: there was none to give
    assert resident_bytes() > 10 * 2**20
