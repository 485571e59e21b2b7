"""Which served model answers a request's ``model`` field."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    """A name clients may use, and the concrete model that serves it."""

    name: str
    target: str


class RouteTable:
    """Maps request model names to concrete models.

    ``resolve`` returns None for unknown names; callers turn that into a 404.
    """

    def __init__(self, models: Iterable[str]) -> None:
        self._routes = {name: Route(name=name, target=name) for name in models}

    def resolve(self, name: str) -> Route | None:
        return self._routes.get(name)

    def names(self) -> list[str]:
        return list(self._routes)
