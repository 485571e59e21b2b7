"""Chooses a variant of a route by weight: sticky per key, random without one.

With a cohort key the choice is weighted rendezvous hashing: every variant
scores ``-weight / ln(u)``, ``u`` a uniform hash of (key, variant) in (0, 1),
and the best score wins. Variant ``i`` wins with probability
``weight_i / sum(weights)``; the same key always gets the same variant; and
when weights change, a key moves only if the variant it moves to gained weight
or the one it leaves lost some, which is the least movement any weighted split
allows. Weight 0 is never chosen.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

_SCALE = float(1 << 52)


@dataclass(frozen=True, slots=True)
class Variant:
    """A concrete model serving a share of a route's traffic."""

    name: str
    weight: float


def choose(variants: Sequence[Variant], key: str | None, rng: random.Random) -> Variant:
    """The variant for ``key`` (or a weighted random one when ``key`` is None).

    Raises ValueError when no variant has a positive weight.
    """
    live = [v for v in variants if v.weight > 0]
    if not live:
        raise ValueError("no variant has a positive weight")
    if key is None:
        return rng.choices(live, weights=[v.weight for v in live])[0]
    return max(live, key=lambda v: _score(key, v))


def ranked(variants: Sequence[Variant], key: str | None, rng: random.Random) -> list[Variant]:
    """Live variants in the order to try them: the chosen one first, then by weight.

    For fallback: when the first is unavailable, the next is the heaviest of
    the rest (ties keep configuration order).
    """
    first = choose(variants, key, rng)
    rest = sorted((v for v in variants if v.weight > 0 and v is not first), key=lambda v: -v.weight)
    return [first, *rest]


def _score(key: str, variant: Variant) -> float:
    digest = hashlib.blake2b(
        f"{key}\x00{variant.name}".encode(), digest_size=8
    ).digest()
    # In (0, 1): the top 52 bits, which a float holds exactly with the half. All 64 rounded the highest
    # values to 1.0, whose log is 0: a ZeroDivisionError, a 500 for ever for that user.
    uniform = ((int.from_bytes(digest, "big") >> 12) + 0.5) / _SCALE
    return -variant.weight / math.log(uniform)
