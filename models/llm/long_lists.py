"""A body's long lists validated a part at a time, the replica's loop
running between the parts.

Pydantic validates a body in one call that no other coroutine interrupts.
A wrong item of a list whose items may take several shapes fails once per
shape: a wrong chat message costs about 160 µs, so 3 MB of them held the
replica's loop (every stream on it) for 16 s, and a 32 MiB body minutes.
``screen`` validates each list longer than ``PART`` items (and each such
list inside an item of a top-level list: a message's ``content`` parts) as
bodies holding one part of it, and refuses the first wrong part as the whole
body's validation words it, with the item's place in the whole body. A body
whose lists are right is then validated whole, as before: its items cost
pydantic a few µs each."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from gateway.errors import InvalidRequestError

PART = 128  # a part of wrong messages costs the loop about 20 ms

Validate = Callable[[dict[str, Any]], Any]


async def screen(validate: Validate, body: dict[str, Any]) -> None:
    """Raises the refusal (InvalidRequestError) ``validate``, the validation
    of a whole body, gives the first wrong part of a long list of ``body``;
    parts that fail elsewhere (a field outside the list) are left to the
    whole body's validation."""
    # Each part's body holds the other long lists cut to a part too (each
    # is screened on its own turn): whole, two of them made the cost their product.
    short = _cut(body)
    for key, items in body.items():
        if not isinstance(items, list):
            continue
        for start in range(0, len(items), PART):
            part = items[start : start + PART]
            for offset, item in enumerate(part):
                if isinstance(item, dict):
                    await _screen_inner(validate, short, key, start + offset, item)
            if len(items) > PART:
                _check(validate, {**short, key: part}, f"{key}[", f"{key}[", start)
                await asyncio.sleep(0)


async def _screen_inner(validate: Validate, short: dict[str, Any], key: str, at: int, item: dict[str, Any]) -> None:
    """``screen`` of the long lists in ``body[key][at]`` (``item``), as
    bodies (``short``: the body, its long lists cut) whose ``key`` holds that item alone."""
    cut = _cut(item)
    for inner, values in item.items():
        if not isinstance(values, list) or len(values) <= PART:
            continue
        for start in range(0, len(values), PART):
            one = {**cut, inner: values[start : start + PART]}
            _check(validate, {**short, key: [one]}, f"{key}[0].{inner}[", f"{key}[{at}].{inner}[", start)
            await asyncio.sleep(0)


def _cut(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` with each list longer than ``PART`` cut to its first part."""
    return {k: v[:PART] if isinstance(v, list) and len(v) > PART else v for k, v in value.items()}


def _check(validate: Validate, part_body: dict[str, Any], part_place: str, place: str, start: int) -> None:
    """``validate(part_body)``; a refusal naming an item of the part (its
    ``param`` beginning ``part_place`` and the item's index) is raised again
    naming that item in the whole body (``place`` and ``start`` + the index)."""
    try:
        validate(part_body)
    except Exception as exc:  # noqa: BLE001 - what names no item, the whole body's validation raises again
        refusal = InvalidRequestError.from_validation(exc) if isinstance(exc, ValidationError) else exc
        if isinstance(refusal, InvalidRequestError) and (moved := _moved(refusal, part_place, place, start)):
            raise moved from None


def _moved(exc: InvalidRequestError, part_place: str, place: str, start: int) -> InvalidRequestError | None:
    """``exc`` with its item's place moved from the part to the whole body;
    None where it names no item of the part."""
    param = exc.param or ""
    found = re.match(re.escape(part_place) + r"(\d+)\]", param)
    if found is None:
        return None
    old, new = found.group(0), f"{place}{start + int(found.group(1))}]"
    message = exc.message.replace(old, new)
    return type(exc)(message, param=new + param[len(old) :], code=exc.code, status=exc.status_code)
