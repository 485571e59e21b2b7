"""Which concrete model answers a request's ``model`` field."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gateway.routing.weighted import Variant, choose


@dataclass(frozen=True, slots=True)
class Route:
    """The name a client used and the concrete model chosen to serve it."""

    name: str
    target: str
    alias: bool


class RouteTable:
    """Concrete model names map to themselves; aliases choose a variant by weight.

    ``resolve`` returns None for unknown names; callers turn that into a 404.
    The random source is injected so tests can fix it.
    """

    def __init__(
        self,
        models: Iterable[str],
        aliases: Mapping[str, Sequence[Variant]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._models = list(models)
        self._aliases = {name: list(variants) for name, variants in (aliases or {}).items()}
        self._rng = rng if rng is not None else random.Random()

    def resolve(self, name: str, key: str | None = None) -> Route | None:
        variants = self._aliases.get(name)
        if variants is not None:
            return Route(name=name, target=choose(variants, key, self._rng).name, alias=True)
        if name in self._models:
            return Route(name=name, target=name, alias=False)
        return None

    def aliases(self) -> dict[str, list[Variant]]:
        return {name: list(variants) for name, variants in self._aliases.items()}
