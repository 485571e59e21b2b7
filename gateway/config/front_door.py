"""The HTTP front door's settings: the ingress replicas, their limits and
timeouts, the access log and cross-origin access."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from gateway.config.base import StrictConfig

# An origin as browsers send it: scheme, host and an optional port; no path.
_ORIGIN = re.compile(r"^https?://[^/\s?#]+/?$", re.IGNORECASE)
# A DNS name, or ``*.`` and one (any name below it), as ``ingress.allowed_hosts`` takes them.
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$", re.IGNORECASE)

# A request's head: its URL and headers together at most HEAD_BYTES, at most
# HEAD_FIELDS headers (as with HAProxy's defaults: a 16 KiB buffer, 101
# headers), whichever front door reads it.
HEAD_BYTES, HEAD_FIELDS = 16384, 100
HEAD_LIMITS = (
    f"a request's URL and headers may take at most {HEAD_BYTES // 1024} KiB together, "
    f"in at most {HEAD_FIELDS} headers."
)


class CorsConfig(StrictConfig):
    """Cross-origin access for chat apps that call the gateway from a browser
    page served elsewhere (the OpenAI and Anthropic JS SDKs in a browser)."""

    allow_origins: list[str] = Field(
        min_length=1,
        description="Origins whose pages may call the gateway (`https://chat.example.com`), "
        "or `*` for any page: with no API keys, any page a user of this host opens could "
        "then use the models.",
    )
    allow_methods: list[str] = Field(
        ["GET", "POST", "DELETE"], min_length=1, description="Methods a page may use (`*`: any)."
    )
    allow_headers: list[str] = Field(
        ["*"],
        description="Request headers a page may send (`*`: any it asks for in the preflight, "
        "e.g. `authorization`, `content-type` and the SDKs' `x-stainless-*`).",
    )
    allow_credentials: bool = Field(
        False,
        description="Whether pages may send cookies or HTTP authentication (API keys in "
        "`Authorization` or `x-api-key` need no credentials); not with `*` origins.",
    )
    max_age_s: int = Field(600, ge=0, le=86400, description="How long browsers keep a preflight's answer.")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"`{origin}` is not an origin: `*`, or scheme and host with an optional port "
                    "and no path (`https://chat.example.com:8443`)"
                )
        # As browsers send it: lower case, no trailing slash, no default port.
        return [_without_default_port(origin.rstrip("/").lower()) for origin in origins]

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        # Browsers ask a preflight for `POST`, whatever case the page wrote it in.
        return [method.upper() for method in methods]

    @model_validator(mode="after")
    def _credentials(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("`allow_credentials` needs the origins named: not with `*`")
        return self


def _without_default_port(origin: str) -> str:
    """``origin`` as a browser's ``Origin`` header writes it: without the
    scheme's default port (``https://chat.example.com:443``)."""
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin.removesuffix(port)
    return origin


class IngressConfig(StrictConfig):
    """The HTTP front door (FastAPI under @serve.ingress)."""

    num_replicas: int = Field(
        1,
        ge=1,
        description="Ingress replicas. With more than one, a `MetricsHub` replica holds the "
        "metrics and the keys' ledger they share; a lone one keeps both itself.",
    )
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved for each ingress replica.")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one ingress replica handles at once."
    )
    retry_after_s: int = Field(
        1, ge=0, description="`Retry-After` seconds sent with 503 when a model is busy or down."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; larger ones are answered 413 before "
        "they are read whole. The rest of such a body is then read and dropped, so that a "
        "client still sending gets the answer, for at most `read_timeout_s`; then the "
        "connection is closed (not behind Serve's own proxy).",
    )
    graceful_shutdown_s: float = Field(
        60,
        ge=0,
        le=3600,
        description="When an ingress replica stops (scaled down, or the gateway stopped), how "
        "long the requests it is serving, streams included, may run on; the models' own "
        "`graceful_shutdown_s` bounds their side.",
    )
    replica_wait_s: float = Field(
        5,
        ge=0,
        le=600,
        description="How long a request waits for its model to have a running replica "
        "(starting, or replacing one that died) before it is answered 503 with "
        "`Retry-After`; while the model stays down, later requests are answered at once.",
    )
    read_timeout_s: float = Field(
        30,
        gt=0,
        le=3600,
        description="A request's headers, and then its body, must each arrive within this "
        "many seconds; slower ones (a stalled or slow-loris client) are answered 408 and "
        "disconnected. The front door bounds the headers (the ingress replicas' own listeners, "
        "or HAProxy), the ingress the body; a client that neither sends nor reads anything for "
        "twice this long is disconnected too (waiting for an answer does not count; not behind "
        "Serve's own proxy).",
    )
    stream_handoff: bool = Field(
        True,
        description="Whether a model replica on the ingress's host is handed the client's "
        "connection to write a stream of chat, completions or messages itself (the ingress "
        "then does no work per token); `false`: every stream's bytes are relayed by the "
        "ingress. Replicas on other hosts, Responses API streams and Serve's own proxy "
        "as the front door are always relayed.",
    )
    access_log: str = Field(
        "stderr",
        min_length=1,
        description="Where each ingress replica writes its JSON access log: `stderr`, `off`, "
        "or a file path that every replica appends to.",
    )
    cors: CorsConfig | None = Field(
        None,
        description="Cross-origin access from browser pages (CORS); none by default: only "
        "pages served by the gateway's own origin may call it from a browser.",
    )
    allowed_hosts: list[str] = Field(
        [],
        description="On a gateway without API keys, the host names browser pages may reach it "
        "by, beyond IP addresses and `localhost`: `gateway.example.com`, `*.example.com` (any "
        "name below it) or `*` (any). A page's request naming another `Host` is refused 403 "
        "`host_not_allowed`: a site may point its own name at the gateway's address once its "
        "page is loaded (DNS rebinding), and the browser would then take the gateway for that "
        "site. Clients that are no browser page (SDKs, curl) are served whatever host they name.",
    )

    @field_validator("access_log", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return "off" if value is False else value  # (YAML reads a bare `off` as false)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if host != "*" and not _HOST.fullmatch(host):
                raise ValueError(
                    f"`{host}` is not a host name: a name (`gateway.example.com`), `*.` and a name "
                    "(`*.example.com`) or `*`; no scheme, port or path"
                )
        # As a Host header is compared: lower case, no trailing dot.
        return [host.lower().rstrip(".") for host in hosts]


# A Serve route prefix: "/", or a path that does not end with "/" and holds no
# braces (Serve refuses those only once the application is deployed).
ROUTE_PREFIX = r"^/([^{}]*[^/{}])?$"
ROUTE_PREFIX_DESCRIPTION = (
    "HTTP path prefix of the app: `/`, or a path without a trailing `/` (the gateway's own front door, "
    "`runtime.http_proxy: gateway`, serves only `/`)."
)


class FrontDoorConfig(StrictConfig):
    """The ingress application's own settings (what its replicas are built from)."""

    app_name: str = Field("llm-gateway", min_length=1, description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=ROUTE_PREFIX, description=ROUTE_PREFIX_DESCRIPTION)
    ingress: IngressConfig = Field(
        default_factory=IngressConfig, description="The HTTP front door."
    )
