"""A request's body, read within the gateway's limits and parsed as one JSON
object: nothing of a body too large is read past the limit, a slow one is cut
off, a compressed one (``Content-Encoding: gzip`` or ``deflate``) is decoded
as it arrives and never past the limit either, and any string that is not
valid Unicode is named."""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from typing import Any

from fastapi import Request

from gateway.errors import (
    InvalidRequestError,
    RequestReadTimeoutError,
    RequestTooLargeError,
    UnsupportedEncodingError,
    UnsupportedMediaTypeError,
)
from gateway.http.client_connection import close_later


async def read_body(
    request: Request, limit: int, timeout_s: float | None = None, expect_json: bool = False
) -> bytes:
    """The request's body; raises UnsupportedMediaTypeError (415) before
    reading any when ``expect_json`` and it is not labelled JSON
    (``check_json_label``), RequestTooLargeError (413) past ``limit``
    bytes, before reading more than that (at once when content-length says
    so), and RequestReadTimeoutError (408) when it has not all arrived
    within ``timeout_s`` (a slow or stalled client). A body in a content
    coding is returned decoded (``BodyDecoder``, within ``limit`` too).
    After an error while the body may still be coming (413, 415, data not in
    its coding) the client's connection is closed ``timeout_s`` later,
    unless another request has started on it (``close_later``)."""
    too_large = RequestTooLargeError(
        f"The request body is larger than this gateway accepts ({limit} bytes)."
    )
    parts: list[bytes] = []
    size = 0
    try:
        if expect_json:
            check_json_label(request.headers.get("content-type"))
        decoder = BodyDecoder.for_header(request.headers.get("content-encoding"), limit)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                parts.append(chunk if decoder is None else decoder.feed(chunk))
    except InvalidRequestError as refusal:
        if not size and request.headers.get("expect", "").lower() == "100-continue":
            # Refused before the client was told to send its body: whether it
            # sends it now or not, what comes next on the connection cannot be
            # told apart from it, so the connection ends with the answer (RFC 9110 10.1.1).
            refusal.extra_headers["connection"] = "close"
            raise
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
    if decoder is not None:
        decoder.finish()
    return b"".join(parts)


def check_json_label(header: str | None) -> None:
    """Raises UnsupportedMediaTypeError when ``header`` (the body's
    ``Content-Type``) labels it as anything but ``application/json`` or a
    ``+json`` type (RFC 6839), parameters such as ``charset`` aside. A body
    with no label is read as JSON: nothing says it is anything else, and
    clients send none (tritonclient's inference calls, hand-written scripts),
    where a form or text label says the body was not meant as JSON."""
    media_type = (header or "").partition(";")[0].strip().lower()
    if not media_type or media_type == "application/json":
        return
    if media_type.startswith("application/") and media_type.endswith("+json"):
        return
    raise UnsupportedMediaTypeError(
        f"The request body must be JSON, labelled `Content-Type: application/json`; "
        f"this request's is `{header.strip() if header else ''}`."
    )


GZIP_BITS = 16 + zlib.MAX_WBITS  # a gzip member (RFC 1952)
DECODED_CODINGS: dict[str, int] = {"gzip": GZIP_BITS, "x-gzip": GZIP_BITS, "deflate": zlib.MAX_WBITS}  # zlib: RFC 1950
ACCEPT_ENCODING = "gzip, deflate"


class BodyDecoder:
    """Decodes a body sent in one content coding as it arrives; raises
    RequestTooLargeError as soon as it would make more than ``limit`` bytes
    (a small body that inflates to gigabytes costs no more than the limit),
    InvalidRequestError for data that is not in that coding."""

    def __init__(self, coding: str, limit: int) -> None:
        self._coding = coding
        self._bits = DECODED_CODINGS[coding]
        self._left = limit
        self._limit = limit
        self._zlib = zlib.decompressobj(self._bits)

    @classmethod
    def for_header(cls, header: str | None, limit: int) -> BodyDecoder | None:
        """The decoder ``Content-Encoding: header`` asks for; None for none
        (or ``identity``); UnsupportedEncodingError (415) for any other."""
        codings = [part.strip().lower() for part in (header or "").split(",")]
        codings = [coding for coding in codings if coding and coding != "identity"]
        if not codings:
            return None
        if len(codings) == 1 and codings[0] in DECODED_CODINGS:
            return cls(codings[0], limit)
        error = UnsupportedEncodingError(
            f"The request body's content coding ({header}) is not one this gateway decodes: "
            f"send it uncompressed, or in one of {ACCEPT_ENCODING}."
        )
        error.extra_headers["accept-encoding"] = ACCEPT_ENCODING
        raise error

    def feed(self, data: bytes) -> bytes:
        """What ``data``, the body's next bytes, decodes to."""
        out = bytearray()
        while data:
            if self._zlib.eof:  # a gzip body may hold several members, one after another
                if self._bits != GZIP_BITS:
                    raise self._invalid("holds more after the end of its compressed data")
                self._zlib = zlib.decompressobj(self._bits)
            try:
                piece = self._zlib.decompress(data, self._left + 1)
            except zlib.error:
                raise self._invalid("is not valid compressed data") from None
            self._left -= len(piece)
            if self._left < 0:
                raise RequestTooLargeError(
                    f"The request body, decoded, is larger than this gateway accepts ({self._limit} bytes)."
                )
            out += piece
            data = self._zlib.unused_data if self._zlib.eof else b""
        return bytes(out)

    def finish(self) -> None:
        """Raises InvalidRequestError when the body ended inside its compressed data."""
        if not self._zlib.eof:
            raise self._invalid("ends before its compressed data does")

    def _invalid(self, what: str) -> InvalidRequestError:
        return InvalidRequestError(f"The request body (Content-Encoding: {self._coding}) {what}.")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises InvalidRequestError otherwise."""
    try:
        # Strict UTF-8 (json.loads of bytes would let encoded surrogates through),
        # after a byte order mark, which JSON parsers may ignore and vLLM's server does.
        body = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
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
