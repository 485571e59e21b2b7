"""A request body in a content coding: decoded as it arrives, within the
gateway's limit, and any coding it cannot decode refused before it is read."""

from __future__ import annotations

import gzip
import random
import zlib

import pytest
from fastapi import Request

from gateway.errors import (
    InvalidRequestError,
    RequestTooLargeError,
    UnsupportedEncodingError,
    UnsupportedMediaTypeError,
)
from gateway.http.body import BodyDecoder, parse_json_object, read_body

BODY = b'{"model": "echo", "messages": [{"role": "user", "content": "hello"}]}' * 50


def request_of(parts: list[bytes], **headers: str) -> tuple[Request, list[bytes]]:
    """A request whose body arrives in ``parts``, and what of it has been read."""
    read: list[bytes] = []

    async def receive() -> dict[str, object]:
        part = parts[len(read)] if len(read) < len(parts) else b""
        read.append(part)
        return {"type": "http.request", "body": part, "more_body": len(read) < len(parts)}

    raw = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw, "query_string": b""}
    return Request(scope, receive), read


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[at:at + size] for at in range(0, len(data), size)]


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("identity", bytes),
        ("identity, gzip", gzip.compress),
    ],
)
async def test_a_body_in_a_coding_it_decodes_arrives_decoded_whatever_its_pieces(coding: str, encode) -> None:
    request, _ = request_of(pieces(encode(BODY), 7), content_encoding=coding)
    assert await read_body(request, limit=len(BODY)) == BODY


async def test_a_gzip_body_of_several_members_is_all_of_them() -> None:
    request, _ = request_of([gzip.compress(BODY[:100]) + gzip.compress(BODY[100:])], content_encoding="gzip")
    assert await read_body(request, limit=len(BODY)) == BODY


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "x-unknown"])
async def test_a_coding_it_cannot_decode_is_415_naming_the_ones_it_can_before_any_is_read(coding: str) -> None:
    request, read = request_of([b"\x28\xb5\x2f\xfd" + BODY], content_encoding=coding)
    with pytest.raises(UnsupportedEncodingError) as raised:
        await read_body(request, limit=len(BODY))
    error = raised.value
    assert (error.status_code, error.code, error.type) == (415, "unsupported_content_encoding", "invalid_request_error")
    assert error.headers() == {"accept-encoding": "gzip, deflate"}
    assert coding in error.message
    assert read == []


@pytest.mark.parametrize(
    ("coding", "data", "what"),
    [
        ("gzip", BODY, "is not valid compressed data"),  # sent plain, labelled gzip
        ("deflate", gzip.compress(BODY), "is not valid compressed data"),
        ("gzip", gzip.compress(BODY)[:-5], "ends before its compressed data does"),
        ("gzip", b"", "ends before its compressed data does"),
        ("deflate", zlib.compress(BODY) + b"{}", "holds more after the end of its compressed data"),
    ],
)
async def test_a_body_not_in_its_coding_is_400_saying_how(coding: str, data: bytes, what: str) -> None:
    request, _ = request_of(pieces(data, 64), content_encoding=coding)
    with pytest.raises(InvalidRequestError) as raised:
        await read_body(request, limit=len(BODY))
    assert raised.value.status_code == 400
    assert raised.value.message == f"The request body (Content-Encoding: {coding}) {what}."


async def test_a_small_body_that_inflates_past_the_limit_is_413_having_made_no_more_than_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # about 64 KiB
    made: list[int] = []
    decoder = BodyDecoder("gzip", limit=1024 * 1024)
    with pytest.raises(RequestTooLargeError) as raised:
        for piece in pieces(bomb, 4096):
            made.append(len(decoder.feed(piece)))
    assert sum(made) <= 1024 * 1024
    assert raised.value.status_code == 413 and "decoded" in raised.value.message

    request, read = request_of(pieces(bomb, 4096), content_encoding="gzip")
    with pytest.raises(RequestTooLargeError):
        await read_body(request, limit=1024 * 1024)
    assert len(read) < len(pieces(bomb, 4096))  # refused as it arrived, not once it was all read


async def test_the_limit_is_on_the_decoded_body_and_on_the_bytes_sent() -> None:
    exact, _ = request_of([gzip.compress(BODY)], content_encoding="gzip")
    assert await read_body(exact, limit=len(BODY)) == BODY
    over, _ = request_of([gzip.compress(BODY)], content_encoding="gzip")
    with pytest.raises(RequestTooLargeError):
        await read_body(over, limit=len(BODY) - 1)
    noise = random.Random(1).randbytes(16 * 1024)  # does not compress: more sent than decoded
    sent, _ = request_of([gzip.compress(noise)], content_encoding="gzip")
    with pytest.raises(RequestTooLargeError):
        await read_body(sent, limit=len(noise))


@pytest.mark.parametrize("raw", [b'{"model": "m"}', b'\xef\xbb\xbf{"model": "m"}', b' \n{"model": "m"}\n'])
def test_a_json_object_is_read_after_a_byte_order_mark_or_whitespace(raw: bytes) -> None:
    assert parse_json_object(raw) == {"model": "m"}


@pytest.mark.parametrize(
    "raw", [b'\xef\xbb\xbf\xef\xbb\xbf{"model": "m"}', b'{"model": "m"}\xef\xbb\xbf', b"\xef\xbb\xbf"]
)
def test_a_byte_order_mark_anywhere_but_first_is_not_json(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="could not parse the JSON body"):
        parse_json_object(raw)


@pytest.mark.parametrize(
    "label",
    ["application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json", " application/json ", ""],
)
async def test_a_body_labelled_json_is_read(label: str) -> None:
    request, _ = request_of([BODY], content_type=label)
    assert await read_body(request, limit=len(BODY), expect_json=True) == BODY


async def test_a_body_with_no_label_is_read_as_json() -> None:
    """tritonclient's inference calls send none: nothing says the body is anything but JSON."""
    request, _ = request_of([BODY])
    assert await read_body(request, limit=len(BODY), expect_json=True) == BODY


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"content_type": "text/plain"}, "`text/plain`"),
        ({"content_type": "application/x-www-form-urlencoded"}, "`application/x-www-form-urlencoded`"),
        ({"content_type": "application/jsonp"}, "`application/jsonp`"),
        ({"content_type": "multipart/form-data; boundary=x"}, "`multipart/form-data; boundary=x`"),
    ],
)
async def test_a_body_not_labelled_json_is_415_before_any_is_read(headers: dict[str, str], named: str) -> None:
    # vLLM's own server refuses it too (400), and OpenAI's API does not read such a body as JSON.
    request, read = request_of([BODY], **headers)
    with pytest.raises(UnsupportedMediaTypeError) as raised:
        await read_body(request, limit=len(BODY), expect_json=True)
    error = raised.value
    assert (error.status_code, error.code, error.type) == (415, "unsupported_media_type", "invalid_request_error")
    assert named in error.message and "application/json" in error.message
    assert read == []


async def test_a_body_no_json_is_expected_of_may_carry_any_label() -> None:
    request, _ = request_of([b"x"], content_type="text/plain")
    assert await read_body(request, limit=10) == b"x"


@pytest.mark.parametrize("headers", [{"content_length": "5000"}, {"content_type": "text/plain"}], ids=["413", "415"])
async def test_a_body_refused_before_its_100_continue_ends_the_connection_with_the_answer(
    headers: dict[str, str]
) -> None:
    # The client may never send the body: its next request would have been read as that body.
    request, read = request_of([BODY], expect="100-continue", **headers)
    with pytest.raises(InvalidRequestError) as raised:
        await read_body(request, limit=1024, expect_json=True)
    assert raised.value.extra_headers["connection"] == "close"
    assert read == []
    request, _ = request_of([BODY], **headers)  # without Expect the connection is kept, as before
    with pytest.raises(InvalidRequestError) as raised:
        await read_body(request, limit=1024, expect_json=True)
    assert "connection" not in raised.value.extra_headers
