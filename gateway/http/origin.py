"""Browser pages of other sites are kept away from the models.

A browser sends some cross-origin requests without asking first (a "simple"
request: a POST whose body is labelled ``text/plain``), so the absence of
CORS headers only keeps a page from reading the answer, not from having the
model generate it. A request to a model route (``/v1``, ``/v2``, ``/tokenize``,
``/detokenize``) that carries an ``Origin`` header (browsers send one; SDKs
and curl do not) is answered 403 unless that origin is the gateway's own
host or one ``ingress.cors`` names.

A site may also point its own name at the gateway's address once its page
is loaded (DNS rebinding): the browser then takes the gateway for that site,
sends its name as ``Host`` and lets the page read every answer. A gateway
without API keys therefore serves those routes to browser pages
(requests with an ``Origin``) only where they name an IP address, a loopback
name (``localhost``) or a host ``ingress.allowed_hosts`` lists, wherever it
listens (a port published on 127.0.0.1 by Docker or an SSH tunnel reaches a
gateway listening on any address), or where they come from an origin
``ingress.cors`` names; requests without one (SDKs, curl, a local proxy
naming its own site) are served. With keys a page has none to send. (A
page's GETs of its own origin carry no ``Origin``: after rebinding, such a
page can still read ``/v1/models`` of a keyless gateway, but not have a
model generate: every POST carries one.)
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import PermissionDeniedError
from gateway.http.auth import PROTECTED
from gateway.http.handlers import envelope, note_refusal
from gateway.http.observe import route_path


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def rebinding_safe(host: str, allowed: Collection[str]) -> bool:
    """Whether a browser naming ``host`` cannot be a page of another site
    pointing its name here: an IP address (a page's own, no name to point),
    a loopback name, or one ``allowed`` lists (``ingress.allowed_hosts``)."""
    host = host.strip("[]").lower().rstrip(".")
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if is_loopback(host) or "*" in allowed or host in allowed:
        return True
    return any(name.startswith("*.") and host.endswith(name[1:]) for name in allowed)


class OriginGuard:
    """``origins`` are those ``ingress.cors`` names (``*``: any), as browsers
    send them; ``hosts`` those ``ingress.allowed_hosts`` names; ``keyless()``
    says whether the gateway has no API keys (pages are then served only on
    hosts that are ``rebinding_safe``)."""

    def __init__(
        self, app: ASGIApp, origins: list[str], hosts: list[str], keyless: Callable[[], bool] = lambda: False
    ) -> None:
        self._app = app
        self._any = "*" in origins
        self._origins = frozenset(origins)
        self._hosts = frozenset(hosts)
        self._keyless = keyless

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""  # the path the routes match
        if not path.startswith(PROTECTED):
            await self._app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is None:  # not a browser's request (SDKs, curl, proxies): nothing to tell here
            await self._app(scope, receive, send)
            return
        named = _header(scope, b"host") or ""
        host, port = _host_and_port("//" + named)
        # (An origin ``ingress.cors`` names is trusted by name: a rebinding page sends its own site's.)
        listed = origin.rstrip("/").lower() in self._origins
        if self._keyless() and not listed and not rebinding_safe(host or "", self._hosts):
            error = PermissionDeniedError(
                f"This gateway has no API keys: it serves browser pages of IP addresses, localhost and the "
                f"hosts `ingress.allowed_hosts` names, not of {host or named or 'a page naming no host'} "
                "(a site may point its own name at this gateway: DNS rebinding).",
                code="host_not_allowed",
            )
        elif not self._any and not self._allowed(origin, host, port):
            error = PermissionDeniedError(
                f"Requests from pages of {origin} are not allowed: this gateway serves browser pages of "
                "its own host, and of other origins only as `ingress.cors` names them."
            )
        else:
            await self._app(scope, receive, send)
            return
        note_refusal(scope, error)
        body = json.dumps(envelope(error, path)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, origin: str, host: str | None, port: int | None) -> bool:
        """A named origin, or a page of the host and port the request was sent
        to (a page of another port of the same host is another origin: another
        site's). A host named without its port is compared by name alone: a
        browser names any port but its scheme's default, and a proxy may drop
        it (nginx's ``proxy_set_header Host $host``)."""
        if origin.rstrip("/").lower() in self._origins:
            return True
        page, page_port = _host_and_port(origin)
        if page is None or page != host:
            return False
        return port is None or (page_port or _DEFAULT_PORTS.get(urlsplit(origin).scheme)) == port


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_and_port(url: str) -> tuple[str | None, int | None]:
    """A URL's host and its port as written (None: none written, or no URL)."""
    try:
        parts = urlsplit(url)
        return parts.hostname, parts.port
    except ValueError:
        return None, None


def _header(scope: Any, name: bytes) -> str | None:
    value = next((v for k, v in scope["headers"] if k == name), None)
    return value.decode("latin-1") if value is not None else None
