"""gateway/routing/weighted.py: the split holds, keys stick, changes move little."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from scipy.stats import chisquare

from gateway.routing.weighted import Variant, choose, ranked

SPLIT = [Variant("v1", 80), Variant("v2", 20)]
THREE = [Variant("a", 50), Variant("b", 30), Variant("c", 20)]
N = 20_000


def observed(counts: Counter[str], variants: list[Variant]) -> list[int]:
    return [counts[v.name] for v in variants]


def expected(variants: list[Variant], n: int) -> list[float]:
    total = sum(v.weight for v in variants)
    return [n * v.weight / total for v in variants]


@pytest.mark.parametrize("variants", [SPLIT, THREE], ids=["80/20", "50/30/20"])
def test_keyed_choices_fit_the_weights(variants: list[Variant]) -> None:
    counts = Counter(choose(variants, f"user-{i}", random.Random(0)).name for i in range(N))
    assert chisquare(observed(counts, variants), expected(variants, N)).pvalue > 0.001


@pytest.mark.parametrize("variants", [SPLIT, THREE], ids=["80/20", "50/30/20"])
def test_unkeyed_choices_fit_the_weights(variants: list[Variant]) -> None:
    rng = random.Random(1234)
    counts = Counter(choose(variants, None, rng).name for _ in range(N))
    assert chisquare(observed(counts, variants), expected(variants, N)).pvalue > 0.001


def test_a_key_always_gets_the_same_variant() -> None:
    for i in range(500):
        picks = {choose(THREE, f"session-{i}", random.Random(seed)).name for seed in range(5)}
        assert len(picks) == 1


def test_weight_zero_is_never_chosen() -> None:
    variants = [Variant("on", 1), Variant("off", 0)]
    rng = random.Random(7)
    assert {choose(variants, f"k{i}", rng).name for i in range(3000)} == {"on"}
    assert {choose(variants, None, rng).name for _ in range(3000)} == {"on"}


def test_all_zero_weights_are_refused() -> None:
    with pytest.raises(ValueError):
        choose([Variant("a", 0), Variant("b", 0)], "k", random.Random(0))


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([Variant("v1", 80), Variant("v2", 20)], [Variant("v1", 50), Variant("v2", 50)]),
        ([Variant("v1", 90), Variant("v2", 10)], [Variant("v1", 80), Variant("v2", 20)]),
        (THREE, [Variant("a", 50), Variant("b", 30), Variant("c", 20), Variant("d", 25)]),
    ],
    ids=["80/20->50/50", "90/10->80/20", "add-variant"],
)
def test_weight_change_moves_only_the_necessary_share(
    before: list[Variant], after: list[Variant]
) -> None:
    keys = [f"user-{i}" for i in range(N)]
    moved = sum(
        choose(before, k, random.Random(0)).name != choose(after, k, random.Random(0)).name
        for k in keys
    ) / N
    share = lambda vs: {v.name: v.weight / sum(x.weight for x in vs) for v in vs}  # noqa: E731
    old, new = share(before), share(after)
    minimum = sum(max(0.0, new.get(n, 0) - old.get(n, 0)) for n in set(old) | set(new))
    assert moved == pytest.approx(minimum, abs=0.015)


def test_ranked_puts_the_choice_first_then_the_rest_by_weight() -> None:
    order = ranked(THREE, "some-key", random.Random(0))
    assert order[0] == choose(THREE, "some-key", random.Random(0))
    rest = order[1:]
    assert [v.weight for v in rest] == sorted((v.weight for v in rest), reverse=True)
    assert {v.name for v in order} == {"a", "b", "c"}


def test_a_key_whose_hash_is_the_highest_is_routed_not_a_division_by_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 bits over 2**64 rounded to 1.0 near the top, and log(1.0) is 0: that user's every request failed.
    import hashlib
    from types import SimpleNamespace

    monkeypatch.setattr(hashlib, "blake2b", lambda data, digest_size: SimpleNamespace(digest=lambda: b"\xff" * 8))
    assert choose(SPLIT, "unlucky", random.Random(0)) in SPLIT


def test_users_keep_the_variants_they_had_before_the_scores_took_52_bits() -> None:
    import hashlib
    import math

    def before(key: str) -> str:  # the earlier score: all 64 bits
        def score(v: Variant) -> float:
            digest = hashlib.blake2b(f"{key}\x00{v.name}".encode(), digest_size=8).digest()
            return -v.weight / math.log((int.from_bytes(digest, "big") + 0.5) / float(1 << 64))

        return max(THREE, key=score).name

    keys = [f"user-{n}" for n in range(N)]
    assert [choose(THREE, k, random.Random(0)).name for k in keys] == [before(k) for k in keys]
