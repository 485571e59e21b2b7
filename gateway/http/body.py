"""A request's body, read within the gateway's limits and parsed as one JSON
object: nothing of a body too large is read past the limit, a slow one is cut
off, and any string that is not valid Unicode is named."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import Request

from gateway.errors import InvalidRequestError, RequestReadTimeoutError, RequestTooLargeError
from gateway.http.client_connection import close_later


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request's body; raises RequestTooLargeError (413) past ``limit``
    bytes, before reading more than that (at once when content-length says
    so), and RequestReadTimeoutError (408) when it has not all arrived
    within ``timeout_s`` (a slow or stalled client). After a 413 the client's
    connection is closed ``timeout_s`` later, unless another request has
    started on it (``close_later``)."""
    too_large = RequestTooLargeError(
        f"The request body is larger than this gateway accepts ({limit} bytes)."
    )
    parts: list[bytes] = []
    size = 0
    try:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                parts.append(chunk)
    except RequestTooLargeError:
        # The connection is kept (the rest of the body is read and dropped, so
        # that a client still sending reliably gets its answer), but for no
        # longer than the body's own time limit.
        if timeout_s is not None:
            close_later(getattr(request, "_send", None), timeout_s)
        raise
    except TimeoutError:
        # Answered with `Connection: close` (as RFC 9110 asks of a 408): the
        # connection ends with the answer, so a client still trickling its
        # body cannot hold it.
        error = RequestReadTimeoutError(f"The request body did not arrive within {timeout_s:g} seconds.")
        error.extra_headers["connection"] = "close"
        raise error from None
    return b"".join(parts)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises InvalidRequestError otherwise."""
    try:
        # Strict UTF-8 (json.loads of bytes would let encoded surrogates through).
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from None
    except RecursionError:
        raise InvalidRequestError("The JSON body of your request is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    # Now an unpaired surrogate can only come from a \uD800-\uDFFF escape,
    # so bodies without one are not walked.
    if _SURROGATE_ESCAPE.search(raw) is not None:
        try:
            found = _unpaired_surrogate(body, "")
        except RecursionError:
            raise InvalidRequestError("The JSON body of your request is nested too deeply.") from None
        if found is not None:
            where, char = found
            raise InvalidRequestError(
                f"The JSON body of your request holds an unpaired surrogate (\\u{char:04x}) "
                f"in {where}; strings must be valid Unicode.",
                param=where.removeprefix("a key of ").removeprefix("a key") or None,
            )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(value: Any, path: str) -> tuple[str, int] | None:
    """Where in ``value`` the first string (or key) that is not valid Unicode
    is, and the surrogate it holds; None when every string is valid."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, ord(value[exc.start])
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unpaired_surrogate(key, f"a key of {path}" if path else "a key")
            found = found or _unpaired_surrogate(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unpaired_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None
