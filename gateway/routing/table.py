"""Which concrete model answers a request's ``model`` field."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gateway.routing.weighted import Variant, ranked


@dataclass(frozen=True, slots=True)
class Alias:
    """A route: weighted variants, optional fallback, optional shadow copies."""

    variants: Sequence[Variant]
    fallback: bool = False
    shadow: str | None = None
    shadow_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class Route:
    """The name a client used and where its request goes.

    ``fallbacks`` are the variants to try, in order, when ``target`` fails
    before its first byte; ``shadow`` is a model to copy the request to.
    """

    name: str
    target: str
    alias: bool
    fallbacks: tuple[str, ...] = ()
    shadow: str | None = None


class RouteTable:
    """Concrete model names map to themselves; aliases choose a variant by weight.

    ``resolve`` returns None for unknown names; callers turn that into a 404.
    The random source is injected so tests can fix it.
    """

    def __init__(
        self,
        models: Iterable[str],
        aliases: Mapping[str, Alias] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._models = list(models)
        self._aliases = dict(aliases or {})
        self._rng = rng if rng is not None else random.Random()

    def resolve(self, name: str, key: str | None = None) -> Route | None:
        alias = self._aliases.get(name)
        if alias is not None:
            order = ranked(alias.variants, key, self._rng)
            copy = alias.shadow is not None and self._rng.random() * 100 < alias.shadow_percent
            return Route(
                name=name,
                target=order[0].name,
                alias=True,
                fallbacks=tuple(v.name for v in order[1:]) if alias.fallback else (),
                shadow=alias.shadow if copy else None,
            )
        if name in self._models:
            return Route(name=name, target=name, alias=False)
        return None

    def members(self, name: str) -> list[str]:
        """The concrete models ``name`` may route to (every variant of an
        alias, zero weights included); [] for unknown names."""
        alias = self._aliases.get(name)
        if alias is not None:
            return [variant.name for variant in alias.variants]
        return [name] if name in self._models else []

    def pinned(self, name: str, target: str) -> Route:
        """The route of a request that only ``target`` (one of ``members(name)``)
        can answer: it holds state the request refers to. No fallback, no shadow."""
        return Route(name=name, target=target, alias=name in self._aliases)

    def aliases(self) -> dict[str, list[Variant]]:
        return {name: list(alias.variants) for name, alias in self._aliases.items()}
