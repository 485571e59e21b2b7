"""Aliases over weighted model variants, and how a request picks one."""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from gateway.config.base import ModelName, StrictConfig

class ShadowConfig(StrictConfig):
    """Mirrors part of a route's traffic to a model whose answers are discarded."""

    variant: str = Field(description="Concrete model that receives the copies.")
    percent: float = Field(ge=0, le=100, description="Share of the route's requests copied.")


class RouteConfig(StrictConfig):
    """An alias clients may use in `model`, spread over concrete models by weight."""

    name: ModelName
    variants: dict[str, float] = Field(
        min_length=1,
        description="Concrete model name -> weight (>= 0; 0 takes no traffic). "
        "Weights are relative: 80/20 and 4/1 split alike.",
    )
    fallback: bool = Field(
        False,
        description="When the chosen variant is unavailable or fails before the first "
        "byte (5xx), try the next variant by weight; never after the first byte.",
    )
    shadow: ShadowConfig | None = Field(
        None, description="Copies of requests sent in the background; answers discarded."
    )

    @field_validator("variants")
    @classmethod
    def _weights(cls, variants: dict[str, float]) -> dict[str, float]:
        for name, weight in variants.items():
            if weight < 0:
                raise ValueError(f"variant {name!r} has a negative weight ({weight:g})")
        if not any(weight > 0 for weight in variants.values()):
            raise ValueError("every variant has weight 0: the route could serve nothing")
        if not math.isfinite(sum(variants.values())):  # (.inf, or weights whose sum is)
            raise ValueError("the weights must be finite numbers, and so must be their sum")
        return variants


class RoutingConfig(StrictConfig):
    """How requests pick a variant of a route."""

    cohort_header: str = Field(
        "x-session-id",
        min_length=1,
        pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",  # an HTTP header name (RFC 9110's token)
        description="Request header whose value keeps a client on one variant "
        "(OpenAI's `user` field does the same and wins when both are sent).",
    )
    routes: list[RouteConfig] = Field(
        default_factory=list, description="Aliases over weighted variants."
    )
    seed: int | None = Field(
        None,
        description="Seeds the random choices (variants of requests without a cohort, shadow "
        "copies) on each ingress replica, afresh on every deploy: the same sequence each time, "
        "for tests and replays. None: fresh randomness.",
    )
