"""What a local Ray cluster (``llm-gateway serve`` without ``--address``)
needs so that nothing in it listens beyond this machine.

By default Ray's GCS, raylets, every worker's gRPC server, the dashboard and
runtime-env agents and the model replicas' relay ports listen on the node's
network address or on every interface, and Ray Serve's HAProxy puts its stats
page and Prometheus frontend on every interface. Whoever reaches Ray's GCS
can run code. So the local cluster is started as a single-machine one:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray take 127.0.0.1 as the
  node's address, and its servers then bind loopback only (the gateway's own
  relay and ledger ports follow the node's address too);
- HAProxy runs through a small wrapper (``gateway/haproxy_wrapper.py``)
  that rewrites the two listeners its config template binds on every
  interface (``bind :PORT``, ``bind *:PORT``) to 127.0.0.1 before HAProxy
  reads the file. Serve itself is given loopback as its HTTP address
  (``serve_host``), since it binds its fallback proxy (Python, HAProxy's
  backup server) there, and the wrapper moves the front door to the
  address asked for (``--host``; ``*`` for ``0.0.0.0``, as Ray's template
  writes it): with ``--host 0.0.0.0`` the fallback proxy was open on every
  interface, past HAProxy's limits. Unless
  ``RAY_SERVE_HAPROXY_LOG_TARGET`` names a log sink, the wrapper also
  drops the template's syslog target (UDP 127.0.0.1:514): one datagram per
  request with its path and client address to whatever listens there,
  beside the gateway's own access log.
- Ray Serve keeps HAProxy's config, its admin socket (``level admin``,
  ``mode 666``) and its server state in ``/tmp/haproxy-serve/``, a directory
  every local user may enter, and leaves them behind: any local user could
  command the front door (take the ingress out, point it at another
  server). They go into the gateway's own directory instead (mode 700, with
  the wrapper), which stopping removes (``remove_local_files``).

- each Serve replica's gRPC server for calls between deployments, which
  Ray Serve 2.60 binds to ``[::]:0`` whatever the node's address, is bound to
  127.0.0.1 instead (``loopback_replica_servers``, applied as the gateway's
  code loads in each replica of such a cluster; Ray's token authentication, on
  by default for a local cluster in this Ray, guards it too);
- each application's ingress replica (the gateway's ingress, every model's
  replica) serves HTTP on a port of its own, which HAProxy forwards to at the
  node's address (127.0.0.1), but Ray Serve binds it to the front door's
  address (``--host``): with ``--host 0.0.0.0`` those ports were open on
  every interface, past HAProxy's limits, and with a single non-loopback
  address HAProxy could not reach them at all (every request 503). They are
  bound to 127.0.0.1 too (``loopback_replica_servers``).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from gateway.affinity import started_cpus
from gateway.config import ConfigError, RuntimeConfig
from gateway.haproxy_wrapper import LOOPBACK, haproxy_wrapper, is_wrapper
from gateway.http.front_door_socket import KEEPER_VARIABLE, keeper_name

SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AUTH_MODE = "RAY_AUTH_MODE"
HAPROXY_BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
HAPROXY_BUFSIZE = "RAY_SERVE_HAPROXY_TUNE_BUFSIZE"
# Where Ray Serve keeps HAProxy's files, by name in the gateway's directory
# ("": the directory itself). Ray puts each under a folder named by the node's
# id (56 characters), and a Unix socket's path has at most 107: hence a short
# directory name.
HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
_SOCKET_PATH_MAX = 107
# HAProxy's stats page and Prometheus frontend (on loopback): Ray Serve gives
# every HAProxy the same two ports (8404, 9101), so a second gateway on the
# machine (`make test` beside `make serve`) failed to start. Each local
# cluster gets free ones instead, unless these are set.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# Serve's fallback proxy behind HAProxy (on loopback): 8500 and 9500 for every
# cluster, so a second gateway's could not bind. Free ones too, unless set.
FALLBACK_PORTS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# Where those free ports are picked: above the worker ports of `ray start`
# (10002-19999), below Serve's direct-ingress ports (30000-31000) and the
# kernel's ephemeral range (32768 and up by default).
PORT_CANDIDATES = range(20000, 30000)
PORT_TRIES = 50
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
HAPROXY_BUFFER_BYTES = 65536


def environment(runtime: RuntimeConfig, read_timeout_s: float = 30.0, front_door: str = LOOPBACK) -> dict[str, str]:
    """Variables to set before Ray is imported, for a local cluster that
    listens on loopback only besides the front door's own address
    (``front_door``, ``--host``); ``read_timeout_s`` bounds how long HAProxy
    waits for a request's head."""
    env = {**runtime.environment(), **SINGLE_MACHINE, **started_cpus()}
    if runtime.http_proxy == "gateway":  # the ingress replicas' own front door: see front_door_socket
        env[KEEPER_VARIABLE] = keeper_name()
    # An operator's own HAProxy (its path in RAY_SERVE_HAPROXY_BINARY_PATH) is
    # wrapped as the bundled one is; a wrapper already made (a gateway this
    # process's environment started) is used as it is.
    if runtime.http_proxy == "haproxy" and not is_wrapper(os.environ.get(HAPROXY_BINARY)):
        directory = _private_directory()
        try:
            env[HAPROXY_BINARY] = str(haproxy_wrapper(directory, read_timeout_s, front_door))
        except (OSError, ValueError) as exc:  # no HAProxy found, or an operator's path that is none
            shutil.rmtree(directory, ignore_errors=True)
            raise ConfigError(f"runtime.http_proxy haproxy: {exc}") from None
        for name, file in HAPROXY_PATHS.items():
            env[name] = os.environ.get(name) or str(directory / file)
        picked: list[int] = []  # none bound until HAProxy starts: each its own
        for name in (*HAPROXY_PORTS, *FALLBACK_PORTS):
            env[name] = os.environ.get(name) or str(free_port(exclude=picked))
            picked += [int(env[name])] if env[name].isdigit() else []
        # Room for heads past the gateway's limits, answered by its rules (see haproxy_wrapper._DEFAULTS).
        env[HAPROXY_BUFSIZE] = os.environ.get(HAPROXY_BUFSIZE, str(HAPROXY_BUFFER_BYTES))
    return env


def serve_host(env: dict[str, str], host: str) -> str:
    """The HTTP address to give Serve for a cluster started with ``env``
    (``environment``): loopback where the gateway's HAProxy wrapper moves the
    front door to ``host`` (Serve binds its fallback proxy there), else
    ``host`` (Serve's own proxy is the front door)."""
    return LOOPBACK if HAPROXY_BINARY in env else host


def serve_options(runtime: RuntimeConfig, env: dict[str, str], host: str, port: int) -> dict[str, Any]:
    """``serve.start``'s arguments for a cluster started with ``env``
    (``environment``) to take clients at ``host:port``: with
    ``http_proxy: gateway`` Serve runs no proxy and the ingress replicas
    listen there themselves (``gateway.http.front_door``)."""
    return {
        "proxy_location": "Disabled" if runtime.http_proxy == "gateway" else None,
        "http_options": {"host": serve_host(env, host), "port": port},
    }


def free_port(
    host: str = "127.0.0.1", candidates: Sequence[int] | None = None, exclude: Collection[int] = ()
) -> int:
    """A TCP port nothing listens on at ``host`` now, picked at random among
    ``candidates`` (``PORT_CANDIDATES`` below the kernel's ephemeral range by
    default) and not in ``exclude`` (picked already, not bound yet); the
    system's pick where none of those is free.

    Not one the kernel hands out itself: a port picked there now could be
    taken before HAProxy binds it, since every ``bind(0)`` and outgoing
    connection of the cluster's processes draws from that range (a gateway
    failed to start so, HAProxy's stats port taken by then).
    """
    pool = candidates if candidates is not None else _below_ephemeral(PORT_CANDIDATES)
    for port in random.sample(pool, min(PORT_TRIES, len(pool))):
        if port in exclude:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _below_ephemeral(ports: range) -> range:
    """``ports`` short of the range the kernel picks local ports from."""
    try:
        first = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return ports
    return range(ports.start, max(ports.start, min(ports.stop, first)))


def front_door_taken(host: str, port: int) -> OSError | None:
    """Why the front door cannot listen on ``host``:``port`` (something
    already does, or ``host`` is no address of this machine), or None.
    Checked before a local cluster starts, which otherwise fails seconds
    later with HAProxy's own account deep in a trace."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as HAProxy binds
            return None
    except OSError as exc:
        return exc


def _private_directory() -> Path:
    """A new directory only this user may enter, with a name short enough for
    the sockets Ray Serve puts below it (see HAPROXY_PATHS)."""
    base = tempfile.gettempdir()
    # node id folder, "/metrics.sock", and HAProxy's ".<pid>.tmp" while it binds
    if len(base) + len("/llmgw-12345678/") + 56 + len("/metrics.sock.4194304.tmp") > _SOCKET_PATH_MAX:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="llmgw-", dir=base))  # mode 700


def remove_local_files(env: dict[str, str]) -> None:
    """Removes the files ``environment`` made for a cluster (HAProxy's wrapper,
    config, sockets and state), once that cluster has stopped."""
    binary = env.get(HAPROXY_BINARY)
    if binary:
        shutil.rmtree(Path(binary).parent, ignore_errors=True)


def joining(address: str) -> dict[str, str]:
    """Variables to set before Ray is imported by a command that connects to
    the cluster at ``address`` (``auto``: the one last started here). A
    cluster that listens on loopback only must be joined as one too: Ray
    would otherwise look for this machine's services on its network address."""
    hosts = [address]
    if address == "auto":
        current = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray", "ray_current_cluster")
        if os.environ.get("RAY_ADDRESS"):
            hosts = [os.environ["RAY_ADDRESS"]]
        elif current.is_file():
            hosts = [current.read_text().strip()]
        else:  # as Ray finds it: the GCS address its raylets here were started with
            hosts = _raylet_gcs_addresses()
    names = {h.removeprefix("ray://").rsplit(":", 1)[0].strip("[]") for h in hosts}
    if not names or not names <= {"127.0.0.1", "localhost"}:
        return {}
    # Ray turns token authentication on for a cluster it starts on this
    # machine (the token in ~/.ray), and joins one it finds itself (``auto``)
    # with the token, but not one given by address: `--address 127.0.0.1:PORT`
    # was refused. Such a cluster is joined as Ray joins one it finds.
    if AUTH_MODE not in os.environ and _token_available():
        return {**SINGLE_MACHINE, AUTH_MODE: "token"}
    return dict(SINGLE_MACHINE)


def private_token(home: Path | None = None) -> None:
    """Makes the token Ray authenticates this machine's cluster with, where
    Ray keeps it by default, readable by this user alone. Ray writes
    ``~/.ray/auth_token`` as the umask leaves it (0644): on a host whose home
    directories others may enter, any local user could read it, reach the
    loopback GCS and run code as the gateway, or call its models past every
    key check. A token Ray would make is made here instead (its format: 256
    random bits in hex), mode 600; one already there, ours, is set to 600.
    A token given otherwise (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``) is
    the operator's, left as it is."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if os.environ.get(AUTH_MODE, "token").lower() != "token":
        return
    path = (home or Path.home()) / ".ray" / "auth_token"
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # (made meanwhile: tightened below)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as file:
                    file.write(secrets.token_hex(32))
        found = path.stat()
        if found.st_uid == os.getuid() and found.st_mode & 0o077:
            path.chmod(0o600)
    except OSError as exc:  # (a read-only home: Ray reads the token as it is)
        print(f"==> cannot make Ray's token {path} private: {exc.strerror or exc}", file=sys.stderr, flush=True)


def _token_available() -> bool:
    """Whether Ray finds a token to authenticate with (where Ray looks)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else Path.home().joinpath(".ray", "auth_token").is_file()


def _raylet_gcs_addresses(proc: Path = Path("/proc")) -> list[str]:
    found = []
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(b"/raylet"):
            continue
        for arg in args:
            if arg.startswith(b"--gcs-address="):
                found.append(arg.split(b"=", 1)[1].decode(errors="replace"))
    return found


REPLICA_MODULE = "ray.serve._private.replica"
ALL_INTERFACES = "[::]:0"


def loopback_replica_servers() -> bool:
    """In a replica of a single-machine cluster, binds Serve's inter-deployment
    gRPC server and the replica's own HTTP server (direct ingress) to
    loopback; True when it did. Does nothing elsewhere (and never imports Ray:
    it only acts where Serve's replica code is loaded)."""
    replica: Any = sys.modules.get(REPLICA_MODULE)
    if replica is None or os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return False
    add_port = replica.add_port_to_grpc_server
    if not getattr(add_port, "loopback", False):

        def add_loopback_port(server: Any, address: str) -> Any:
            return add_port(server, "127.0.0.1:0" if address == ALL_INTERFACES else address)

        add_loopback_port.loopback = True  # type: ignore[attr-defined]
        replica.add_port_to_grpc_server = add_loopback_port
    start_http = replica.start_asgi_http_server
    if not getattr(start_http, "loopback", False):

        async def start_loopback_http_server(app: Any, http_options: Any, **kwargs: Any) -> Any:
            # HAProxy reaches ingress replicas at the node's address, which is
            # loopback here, whatever address the front door binds.
            if http_options.host != LOOPBACK:
                http_options = http_options.model_copy(update={"host": LOOPBACK})
            return await start_http(app, http_options, **kwargs)

        start_loopback_http_server.loopback = True  # type: ignore[attr-defined]
        replica.start_asgi_http_server = start_loopback_http_server
    return True
