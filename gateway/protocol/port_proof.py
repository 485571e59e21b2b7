"""A token-guarded port proves itself to each new connection before the
caller sends anything of value.

Callers prove themselves to a port by sending its token (the relay's
``authorization`` header, the limiter's hello). That alone would let whoever
listens at a port's address, once its owner has stopped and before callers
forget the address, read what they send there: the token, a client's prompt,
a key's id. So the caller opens each connection with a random challenge::

    LLMGW-PORT/1 <32 hex digits>\\r\\n

and the port answers with its HMAC-SHA256 under the token::

    <64 hex digits>\\r\\n

which only the token's holder can make. The caller sends nothing more to a
port whose answer is wrong, late or missing (``PortImpostorError``). One round
trip per new connection; kept connections pay nothing more.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

PREFIX = b"LLMGW-PORT/1 "
NONCE_BYTES = 16
# A challenge line, at most (an answer's is shorter).
LINE_BYTES = len(PREFIX) + 2 * NONCE_BYTES + 2
# What the answer's HMAC is of, besides the nonce: it is of use for nothing
# else made with the token.
_PORT_SIDE = b"llm-gateway port\0"


class PortImpostorError(ConnectionError):
    """The port did not prove it holds the token: it is not the one its address named."""


def challenge() -> tuple[bytes, bytes]:
    """A fresh nonce and the line that sends it."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, PREFIX + nonce.hex().encode() + b"\r\n"


def answer(token: str, nonce: bytes) -> bytes:
    """The port's answer line to ``nonce``."""
    return proof(token, nonce).encode() + b"\r\n"


def proof(token: str, nonce: bytes) -> str:
    return hmac.new(token.encode(), _PORT_SIDE + nonce, hashlib.sha256).hexdigest()


def nonce_of(line: bytes) -> bytes:
    """The nonce a challenge line carries; raises ValueError when it is not one."""
    if not line.startswith(PREFIX) or not line.endswith(b"\r\n") or len(line) != LINE_BYTES:
        raise ValueError("not a port challenge")
    return bytes.fromhex(line[len(PREFIX) : -2].decode("ascii"))


async def prove(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, timeout_s: float) -> bool:
    """The port's side: reads a new connection's challenge and answers it.
    False (nothing written) when the caller sent none in ``timeout_s``."""
    try:
        line = await asyncio.wait_for(reader.readexactly(LINE_BYTES), timeout_s)
        nonce = nonce_of(line)
    except (ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    writer.write(answer(token, nonce))
    return True


async def check(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, timeout_s: float) -> None:
    """The caller's side: challenges a new connection's port; raises
    ``PortImpostorError`` unless it answers with the token's proof in ``timeout_s``."""
    nonce, line = challenge()
    writer.write(line)
    try:
        got = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout_s)
    except asyncio.TimeoutError:
        raise PortImpostorError("the port did not answer its challenge in time") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise PortImpostorError("the port did not answer its challenge") from None
    if not hmac.compare_digest(got[:-2], proof(token, nonce).encode()):
        raise PortImpostorError("the port's answer does not prove its token")
