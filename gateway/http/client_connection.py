"""The client's connection under uvicorn (the ingress's own HTTP server behind
HAProxy), reached past the ASGI ``send`` wrappers (Starlette's, Serve's,
ours): the relay writes a stream's bytes to its socket, and a connection
that goes on sending a refused body is closed after a while. And a client's
hang-up, seen through ASGI ``receive`` under any server."""

from __future__ import annotations

import asyncio
import functools
from typing import Any


async def disconnected(receive: Any) -> None:
    """Returns when the client hangs up (the request's body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def uvicorn_cycle(send: Any) -> Any:
    """uvicorn's request-response cycle behind ``send``; None when there is
    none (Serve's own proxy in front, tests)."""
    seen: set[int] = set()
    stack = [send]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        owner = getattr(fn, "__self__", None)
        if type(owner).__name__ == "RequestResponseCycle" and type(owner).__module__.startswith("uvicorn."):
            return owner
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                content = cell.cell_contents
            except ValueError:
                continue
            if callable(content):
                stack.append(content)
        if isinstance(fn, functools.partial):  # how Starlette's CORS middleware wraps `send`
            stack += [part for part in (*fn.args, *fn.keywords.values()) if callable(part)]
    return None


def close_later(send: Any, delay_s: float) -> bool:
    """Closes the client's connection ``delay_s`` from now unless another
    request has started on it; False when there is no uvicorn connection.

    For a request refused before its body has all arrived (413): uvicorn
    reads and drops the rest of the body after the answer, so that a client
    still sending gets it instead of a reset, but for as long as the client
    sends (one measured 24 GB in 20 s, HAProxy and the ingress busy all the
    while). Like nginx's lingering close, this bounds that."""
    cycle = uvicorn_cycle(send)
    protocol = getattr(getattr(cycle, "on_response", None), "__self__", None)
    if protocol is None or not hasattr(protocol, "transport"):
        return False
    asyncio.get_running_loop().call_later(delay_s, _close_if_same, protocol, cycle)
    return True


def _close_if_same(protocol: Any, cycle: Any) -> None:
    if protocol.cycle is cycle and not protocol.transport.is_closing():
        protocol.transport.close()
