"""Sampling fields out of their range, refused in OpenAI's words and naming
the field before vLLM sees them.

vLLM checks these ranges too (``SamplingParams._verify_args``), but names
the field for only some of them: a ``presence_penalty`` of -3 came back
"presence_penalty must be in [-2, 2], got -3.0." with ``param`` null. Here
every one is refused as OpenAI refuses a number out of range ("Invalid
'presence_penalty': decimal below minimum value. Expected a value >= -2, but
got -3 instead.", ``param`` the field), with the bounds vLLM applies; an
empty ``stop`` or ``bad_words`` string likewise, ``param`` its path
(``stop[1]``) as the message names it ("stop cannot contain an empty
string.", ``param`` null, from vLLM); several choices at temperature 0,
naming ``n`` ("n must be 1 when using greedy sampling, got
2.", ``param`` null, from vLLM); and an output budget larger
than the model's context window, as OpenAI refuses one above a model's
most ("max_tokens is too large: 5000. This model supports at most 2048
completion tokens, whereas you provided 5000.", ``param`` the field sent),
where vLLM said it of its own ``max_tokens`` whichever field was sent.
The Messages API's ``temperature`` is bounded as Anthropic bounds it, 0 to
1 (vLLM took up to 2), and an empty ``stop_sequences`` string is named by
its own path, where vLLM named the ``stop`` it makes of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from gateway.errors import InvalidRequestError
from gateway.validation import bound_code, out_of_bounds


class Bounds(NamedTuple):
    """A field's range: ``low``/``high`` None for no bound; ``open_low`` when
    ``low`` itself is refused. An int bound marks an integer field."""

    low: float | None
    high: float | None
    open_low: bool = False


# vLLM's ranges (top_k: -1 or 0 turn it off).
RANGES: dict[str, Bounds] = {
    "temperature": Bounds(0.0, 2.0),
    "top_p": Bounds(0.0, 1.0, open_low=True),
    "presence_penalty": Bounds(-2.0, 2.0),
    "frequency_penalty": Bounds(-2.0, 2.0),
    "repetition_penalty": Bounds(0.0, None, open_low=True),
    "min_p": Bounds(0.0, 1.0),
    "top_k": Bounds(-1, None),
    "min_tokens": Bounds(0, None),
}

# Anthropic's Messages API takes a temperature of 0 to 1 (vLLM's schema for
# it takes any, and its sampling up to 2) and a top_k of at least 0 (vLLM's
# -1, "off", is no value of Anthropic's), its other fields within vLLM's.
ANTHROPIC_RANGES: dict[str, Bounds] = {**RANGES, "temperature": Bounds(0.0, 1.0), "top_k": Bounds(0, None)}


# String lists vLLM refuses an empty string in, naming no field (the Messages
# API's ``stop_sequences`` as the ``stop`` it becomes, a field not sent).
NON_EMPTY = ("stop", "bad_words", "stop_sequences")


def check_sampling(request: Any, budget: int | None, ranges: Mapping[str, Bounds] = RANGES) -> None:
    """Refuses the first sampling field of ``request`` (vLLM-parsed, any
    endpoint) that is out of its range in ``ranges`` (``ANTHROPIC_RANGES``
    for the Messages API), an empty string in ``stop``, ``bad_words`` or
    ``stop_sequences``, or a ``min_tokens`` above the output ``budget``;
    fields the request lacks or left unset pass."""
    for field, bounds in ranges.items():
        value = getattr(request, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check(field, value, bounds)
    for field in NON_EMPTY:
        _check_non_empty(field, getattr(request, field, None))
    _check_choices(request)
    check_least_tokens(request, budget)


def check_least_tokens(request: Any, budget: int | None) -> None:
    """Refuses a ``min_tokens`` of ``request`` above the output ``budget``
    (the field sent, or the window's rest after the prompt where none was),
    naming it: vLLM named no field for it. None or an unset field passes."""
    least = getattr(request, "min_tokens", None)
    if isinstance(least, int) and budget is not None and least > budget:
        raise InvalidRequestError(
            f"Invalid 'min_tokens': {out_of_bounds(least, 'above maximum', '<=', budget)} "
            "It may not exceed the request's output budget.",
            param="min_tokens",
            code=bound_code(least, "above maximum", budget),
        )


def _check_choices(request: Any) -> None:
    """Refuses several choices at temperature 0, naming ``n``: vLLM makes one
    greedy answer (beam search aside) and refused with no field. vLLM raises
    any temperature in (0, 0.01) to 0.01 (``_MAX_TEMP``) before it looks for
    a greedy one (below 1e-5), so only 0 itself is greedy there."""
    n, temperature = getattr(request, "n", None), getattr(request, "temperature", None)
    if not isinstance(n, int) or n <= 1 or getattr(request, "use_beam_search", False):
        return
    if isinstance(temperature, (int, float)) and temperature == 0:
        raise InvalidRequestError(
            f"Invalid 'n': {n} choices were asked for at temperature {temperature:g}, where the engine samples "
            "greedily and makes one. Ask for one choice, or set a temperature above 0.",
            param="n",
        )


def _check_non_empty(field: str, strings: object) -> None:
    listed = [strings] if isinstance(strings, str) else strings
    if not isinstance(listed, list):
        return
    for index, string in enumerate(listed):
        if string == "":
            where = field if isinstance(strings, str) else f"{field}[{index}]"
            raise InvalidRequestError(
                f"Invalid '{where}': string too short. Expected a string with minimum length 1, "
                "but got an empty string instead.",
                param=where,
            )


def _check(field: str, value: float, bounds: Bounds) -> None:
    if not math.isfinite(value):
        raise InvalidRequestError(f"Invalid '{field}': expected a finite number, but got {value} instead.", param=field)
    low, high = bounds.low, bounds.high
    if low is not None and (value < low or (bounds.open_low and value == low)):
        side, sign, limit = "below minimum", ">" if bounds.open_low else ">=", low
    elif high is not None and value > high:
        side, sign, limit = "above maximum", "<=", high
    else:
        return
    words = out_of_bounds(value, side, sign, limit)
    raise InvalidRequestError(f"Invalid '{field}': {words}", param=field, code=bound_code(value, side, limit))


def check_budget_fits(field: str, budget: int | None, most: int) -> None:
    """Refuses an output ``budget`` (sent as ``field``: ``max_tokens``,
    ``max_completion_tokens``, ``max_output_tokens``) above ``most``, the
    model's context window, whatever the prompt: no shorter prompt makes it fit."""
    if budget is None or budget <= most:
        return
    output = "output" if field == "max_output_tokens" else "completion"
    raise InvalidRequestError(
        f"{field} is too large: {budget}. This model supports at most {most} {output} tokens, "
        f"whereas you provided {budget}.",
        param=field,
        code="invalid_value",
    )
