"""The ``llm-gateway`` command.

``llm-gateway serve``        run the gateway in the foreground until SIGINT/SIGTERM
``llm-gateway deploy``       apply a changed config to a running gateway
``llm-gateway status``       each deployment's replicas, nodes and placement
``llm-gateway build-model``  build the local models (no hub needed)
``llm-gateway keys new``     make an API key: the secret, then its config entry
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.config.base import user_path
from gateway.http.front_door_socket import KEEPER_VARIABLE, SocketKeeper

DEFAULT_CONFIG = "configs/default.yaml"
# How often processes started since (new Ray workers) are pinned too.
PIN_EVERY_S = 10
PR_SET_PDEATHSIG = 1  # prctl(2)


def command_line() -> argparse.ArgumentParser:
    """The ``llm-gateway`` command line: its subcommands and their options."""
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the gateway in the foreground")
    serve_cmd.add_argument("--config", default=DEFAULT_CONFIG, help="gateway YAML config")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=port_number, default=8000)
    serve_cmd.add_argument(
        "--address", default=None, help="join this Ray cluster instead of starting a local one"
    )

    deploy_cmd = commands.add_parser(
        "deploy", help="apply a changed config to a running gateway (routing changes are live)"
    )
    deploy_cmd.add_argument("--config", default=DEFAULT_CONFIG, help="gateway YAML config")
    deploy_cmd.add_argument("--address", default="auto", help="Ray cluster address")

    status_cmd = commands.add_parser(
        "status", help="each deployment's replicas with their node and placement"
    )
    status_cmd.add_argument("--app", default="llm-gateway", help="the gateway's app_name")
    status_cmd.add_argument("--address", default="auto", help="Ray cluster address")
    status_cmd.add_argument("--json", action="store_true", help="print JSON")

    env_cmd = commands.add_parser(
        "env",
        help="the Ray environment that a cluster the gateway joins must start with, as `llm-gateway serve` "
        "starts its own: runs COMMAND with it (`llm-gateway env --config C -- ray start --head`), "
        "or prints it (KEY=value lines, quoted for a shell)",
    )
    env_cmd.add_argument("--config", default=DEFAULT_CONFIG, help="gateway YAML config")
    env_cmd.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="a command to run with it")

    build_cmd = commands.add_parser("build-model", help="build the local models (tiny chat, iris, MiniLM)")
    build_cmd.add_argument("--out", default=".models", help="directory to build into")
    build_cmd.add_argument("--force", action="store_true", help="rebuild existing models")

    keys_cmd = commands.add_parser("keys", help="API keys")
    keys_new = keys_cmd.add_subparsers(dest="keys_command", required=True).add_parser(
        "new",
        help="make a key: prints the secret alone on the first line, then the YAML "
        "entry to put under `keys:` (the secret is not stored anywhere)",
    )
    keys_new.add_argument("--id", required=True, help="the key's name (safe to log)")
    keys_new.add_argument("--models", default=None, help="comma-separated names or globs (default: all)")
    keys_new.add_argument("--rpm", type=int, default=None, help="requests per minute")
    keys_new.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    keys_new.add_argument("--max-concurrent", type=int, default=None, help="requests at once")
    keys_new.add_argument("--expires", default=None, help="ISO 8601 time with a zone")
    keys_new.add_argument(
        "--ops", action="store_true",
        help="an operations key: for /health, /ready and /metrics only (no models, no limits)",
    )

    return parser


def _check_access_log(sink: str) -> None:
    """Raises ConfigError where the access log's file could not be opened by
    the ingress replicas this process starts (each would fail its start)."""
    if sink in ("stderr", "off"):
        return
    path = user_path(sink, "ingress.access_log")
    where = path if path.exists() else path.parent
    if not os.access(where, os.W_OK) or (path.exists() and not path.is_file()):
        raise ConfigError(f"ingress.access_log: cannot write {sink!r} ({where} is missing or not writable)")


def port_number(text: str) -> int:
    """A TCP port number, as argparse takes it (else its usage error, not a traceback)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build-model":
            return _said(lambda: build_model(Path(args.out), force=args.force), "build-model", (OSError,))
        if args.command == "keys":
            return new_key(args)
        if args.command == "status":
            return _said(lambda: show_status(args.app, args.address, as_json=args.json), "status")
        if args.command == "env":
            # Only ``runtime`` is read: a node without the models' directories gets its environment too.
            return run_with_environment(load_config(Path(args.config), paths=False), args.run)
        config = load_config(Path(args.config))
        if args.command == "deploy":
            return _said(lambda: redeploy(config, args.address), "deploy")
        from gateway.deploy import DeployFailed  # (imports no Ray)

        # A cluster not there, a deploy that failed or timed out: any other error of its own, a bug,
        # keeps its traceback.
        said = (ConnectionError, TimeoutError, DeployFailed)
        return _said(lambda: serve_forever(config, args.host, args.port, args.address), "serve", said)
    except ConfigError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2


_CLUSTER_ERRORS: tuple[type[Exception], ...] = (ConnectionError, TimeoutError, RuntimeError)


def _said(command: Callable[[], int], name: str, said: tuple[type[Exception], ...] = _CLUSTER_ERRORS) -> int:
    """``command()``; a cluster that is not there, a replica that failed its
    start or a deploy that timed out said in one line (exit status 1), not as
    a traceback: errors of the kinds ``said``, and Ray's own."""
    try:
        return command()
    except Exception as exc:
        ray_errors = sys.modules.get("ray.exceptions")  # (Ray's own, e.g. a cluster's token not found)
        if not isinstance(exc, said) and not (ray_errors is not None and isinstance(exc, ray_errors.RayError)):
            raise
        print(f"llm-gateway {name}: {exc}", file=sys.stderr)
        return 1


def new_key(args: argparse.Namespace) -> int:
    """Prints a new secret, then its ``keys:`` entry (validated as the config would be)."""
    import yaml
    from pydantic import ValidationError

    from gateway.auth.keys import hash_secret, new_secret
    from gateway.config import KeyConfig

    secret = new_secret()
    entry: dict[str, object] = {"id": args.id, "hash": hash_secret(secret)}
    if args.models is not None:  # given empty (an unset shell variable), it must not mean "all"
        entry["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if not entry["models"]:
            raise ConfigError("--models: no model named (leave --models out for a key to every model)")
    for field in ("rpm", "tpm", "max_concurrent", "expires"):
        if getattr(args, field) is not None:
            entry[field] = getattr(args, field)
    if args.ops:
        entry["ops"] = True
    try:
        KeyConfig.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(map(str, e["loc"])), str(e["msg"]).removeprefix("Value error, "))))
            for e in exc.errors()
        )
        raise ConfigError(f"invalid key: {problems}") from None
    print(secret)
    print(yaml.safe_dump([entry], sort_keys=False), end="")
    return 0


def run_with_environment(config: GatewayConfig, command: list[str]) -> int:
    """Runs ``command`` (replacing this process) with the variables Ray and
    Serve must read on every node of a cluster the gateway is deployed on
    (``runtime``'s, and an operator's overrides of them in this environment)
    added to this one's; without a command, prints them, one ``KEY=value`` a
    line, quoted for a shell. A config that fails to load runs nothing, where
    ``env $(llm-gateway env ...) ray start`` would start Ray without them."""
    variables = config.runtime.environment()
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        for name, value in sorted(variables.items()):
            print(f"{name}={shlex.quote(value)}")
        return 0
    for ignored in (signal.SIGPIPE, signal.SIGXFSZ):  # (Python ignores them; an exec'd command would too)
        signal.signal(ignored, signal.SIG_DFL)
    try:
        os.execvpe(command[0], command, {**os.environ, **variables})
    except OSError as exc:
        print(f"llm-gateway env: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # (not reached: execvpe returns only by raising)


def build_model(out: Path, *, force: bool) -> int:
    from models.classical import build as classical
    from models.llm import tiny, tiny_lora

    started = time.monotonic()
    built = tiny.build_all(out, force=force) + tiny_lora.build_all(out, force=force)
    for path in built + classical.build_all(out, force=force):
        print(f"==> local model ready: {path}")
    print(f"==> models ready in {time.monotonic() - started:.0f}s")
    return 0


def show_status(app: str, address: str, *, as_json: bool) -> int:
    import json

    from gateway.local_cluster import joining

    os.environ.update(joining(address))  # before Ray is imported
    import ray

    from gateway import status

    ray.init(address=address, logging_level=logging.WARNING)
    found = status.collect(app)
    print(json.dumps(found, indent=2) if as_json else status.render(found))
    return 0 if found["applications"] else 1


def redeploy(config: GatewayConfig, address: str) -> int:
    """Applies a changed config to a running gateway.

    Weight and route changes reconfigure the ingress in place; a model added
    or removed starts or stops only that model; a model whose settings changed
    restarts alone (replica counts, batching and LoRA adapters within the
    engine's limits apply without a restart). No request in flight fails.
    Prints what happened to each model changed. Run it from the directory the
    gateway was started in (relative model paths resolve against it).
    """
    from gateway.local_cluster import joining

    joined = joining(address)
    if joined:  # a cluster on this machine's loopback: its replicas open the log here
        _check_access_log(config.ingress.access_log)
    os.environ.update(joined)  # before Ray is imported
    import ray

    from gateway.deploy import deploy

    from ray.serve.context import _get_global_client

    ray.init(address=address, logging_level=logging.WARNING)
    # (Serve started here would take its defaults, and a later `serve --host` be ignored.)
    if _get_global_client(raise_if_no_controller_running=False) is None:
        print("llm-gateway deploy: no gateway runs on this cluster; start one with `llm-gateway serve`",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    changed = deploy(config)
    for name, what in changed.items():
        print(f"==> {name}: {what}")
    print(f"==> {config.app_name} updated in {time.monotonic() - started:.1f}s")
    return 0


# How long after a stop's drain began a second Ctrl-C is taken for a person's.
AGAIN_AFTER_S = 1.0


class _Stop(BaseException):
    """Raised from a signal handler to leave the serving loop, or a drain,
    cleanly (a BaseException: no ``except Exception`` on the way takes it)."""


def _raise_stop(signum: int, _: FrameType | None) -> None:
    # Once: a copy of the same stop (``pkill`` hits this process and the parent
    # that forwards it) must not raise again while the first one is handled.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def access_note(config: GatewayConfig, host: str) -> str:
    """Who may use the gateway, said at start-up (a warning when anyone on the network may)."""
    import ipaddress

    api = [k for k in config.keys if not k.ops]
    ops = len(config.keys) - len(api)
    guarded = f"; {ops} operations keys: /health, /ready and /metrics need one" if ops else ""
    if api:
        return f"{len(api)} API keys configured: /v1 and /v2 need one{guarded}"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    cors = config.ingress.cors
    if cors is not None and "*" in cors.allow_origins:
        return (
            f"WARNING: no API keys configured and `ingress.cors` allows any origin: any web page "
            f"a user of this machine opens may use every model (add `keys:`, see README){guarded}"
        )
    pages = f", and to pages of {', '.join(cors.allow_origins)} in their browsers" if cors is not None else ""
    if loopback:
        return f"no API keys configured: the gateway is open to this machine's users{pages}{guarded}"
    named = f", and pages of {', '.join(cors.allow_origins)}" if cors is not None else ""
    return (
        f"WARNING: no API keys configured and listening on {host}: anyone who reaches "
        f"it may use every model (add `keys:`, see README); browser pages may reach it only by an IP "
        f"address, localhost or a name `ingress.allowed_hosts` lists{named}{guarded}"
    )


def serve_forever(
    config: GatewayConfig, host: str, port: int, address: str | None
) -> int:
    """Starts Ray (or joins ``address``), deploys the app, serves until signalled.

    On SIGINT or SIGTERM the gateway's applications are removed, their
    requests in flight (streams included) finishing first within their
    ``graceful_shutdown_s``, and, when this process started Ray, the whole
    local cluster (every replica and engine process) is shut down.
    """
    local: dict[str, str] = {}
    if address is None:
        _check_access_log(config.ingress.access_log)
    if address is None and config.runtime.http_proxy == "gateway" and config.route_prefix != "/":
        raise ConfigError(
            f"route_prefix {config.route_prefix!r}: the gateway's own front door serves only `/`; "
            "set `runtime.http_proxy: serve` (or `haproxy`) for a route prefix of its own"
        )
    if address is None:
        if (prepared := _local_environment(config, host, port)) is None:
            return 1
        local = prepared
        if (status := _serve_in_own_group(local)) is not None:
            return status
    else:
        from gateway.local_cluster import joining

        os.environ.update(joining(address))  # before Ray is imported, as deploy and status join it
    import ray
    from ray import serve

    from gateway.deploy import deploy
    from gateway.local_cluster import serve_options

    try:
        keeper = _front_door_keeper(config, host, port, local)
    except OSError as exc:
        print(f"==> cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 1
    print(f"==> {access_note(config, host)}", flush=True)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        print(f"==> starting Ray {'at ' + address if address else '(local)'}", flush=True)
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        # After ray.init: Ray's core installs its own SIGTERM handler there.
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
        if local:
            _start_serve(lambda: serve.start(**serve_options(config.runtime, local, host, port)))
        else:
            _start_serve(lambda: serve.start(http_options={"host": host, "port": port}))
        names = ", ".join(f"{m.name} ({m.engine})" for m in config.models)
        print(f"==> deploying {config.app_name}: {names}; first start compiles the engines", flush=True)
        started = time.monotonic()
        deploy(config)
        print(
            f"==> ready in {time.monotonic() - started:.0f}s: http://{_url_host(host)}:{port}/v1 "
            "(Ctrl-C stops it)",
            flush=True,
        )
        _tend_processes(config, address)
    except _Stop as stop:
        _say(f"==> {stop}: shutting down")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (until the drain, which a second one cuts short)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if keeper is not None:
            keeper.close()  # the socket closes with the last ingress replica: new clients are refused
        _stop_serving(config, own_cluster=bool(local))
        if local:
            from gateway.local_cluster import remove_local_files

            remove_local_files(local)
        _say("==> stopped")
    return 0


SERVE_START_TRIES = 3


def _start_serve(start: Callable[[], object]) -> None:
    """``start()`` (Serve's start, which waits for its proxies), again where a
    proxy died meanwhile: on a busy machine Serve's controller gives a proxy
    (HAProxy's manager) three ready checks of 5 s, then kills it and starts
    another with longer ones, and the first start fails with the killed
    actor's error. Started again, Serve keeps its controller (and the options
    it was started with), and the new proxy comes up on its own."""
    from ray.exceptions import RayActorError

    for attempt in range(1, SERVE_START_TRIES + 1):
        try:
            start()
            return
        except RayActorError as exc:
            if attempt == SERVE_START_TRIES:
                raise
            _say(f"==> Serve's proxy was restarted as it started ({str(exc).splitlines()[0]}); waiting for it again")


def _front_door_keeper(config: GatewayConfig, host: str, port: int, local: dict[str, str]) -> SocketKeeper | None:
    """With the gateway's own front door, a socket on its port that every
    ingress replica of the local cluster (``local``: its environment) accepts
    from too, kept by this process while Ray runs
    (``gateway.http.front_door_socket``); OSError when the port is taken."""
    if KEEPER_VARIABLE not in local:
        return None
    return SocketKeeper(host, port, local[KEEPER_VARIABLE])


def _serve_in_own_group(local: dict[str, str]) -> int | None:
    """Forks: the child returns None and goes on to serve, in a process group
    of its own, so that a stop signal sent to this process's group
    (``timeout(1)``, a shell's ``kill %1``, ``kill -TERM -PGID``) reaches
    ``llm-gateway serve`` alone and not the Ray daemons it starts, which the
    drain needs. The child stays in this process's session: Linux's autogroup
    scheduling (on by default) shares a busy CPU between sessions first, so a
    gateway in a session of its own was one share against every other
    session's processes, and its frontends and vLLM's scheduler waited behind
    each other inside it (whole answers held back on 2 vCPUs; README,
    "Sessions and the scheduler"). Its standard input is /dev/null and it
    ignores SIGTTOU: a process of a background group that read the terminal,
    or wrote to one set to ``tostop``, would be stopped.
    This process forwards SIGINT and SIGTERM to the child and returns its
    exit status once it has stopped (128 + the signal that ended it), having
    removed the local cluster's files where a child cut short left them."""
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # Writes to a terminal set to `tostop` would stop a background group; Ray's processes inherit this.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        # Stops (and drains) when this process's parent goes, even by SIGKILL.
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        return None
    with contextlib.suppress(OSError):  # as the child does, before any signal could reach it in this group
        os.setpgid(child, child)

    def forward(signum: int, _: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):  # (reaped a moment ago)
            os.kill(child, signum)

    def hung_up(_signum: int, _: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):  # the terminal is gone: stop (and drain) as for a stop signal
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    # A hang-up would end this process at once, before the child has drained
    # and this process removed the local cluster's files.
    signal.signal(signal.SIGHUP, hung_up)
    _, status = os.waitpid(child, 0)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # no child to pass them to: the files go first
        signal.signal(signum, signal.SIG_IGN)
    from gateway.local_cluster import remove_local_files

    remove_local_files(local)  # gone already, unless the child was cut short
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _listen_hint(error: OSError) -> str:
    """What to check when the front door cannot listen, by why."""
    if error.errno == errno.EADDRINUSE:
        return " (another gateway, or one that did not stop cleanly? `ss -ltnp` names the process)"
    if error.errno == errno.EACCES:
        return " (ports below 1024 need privileges this user lacks: use one above, e.g. --port 8000)"
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return (" (--host takes an address of this machine: an IP address (IPv6 without brackets, `::1`) "
                "or a name that resolves to one)")
    return ""


def _local_environment(config: GatewayConfig, host: str, port: int) -> dict[str, str] | None:
    """Sets what Ray and Ray Serve read at import and cluster start for a
    local cluster, and returns it; None (said on stderr) when the front
    door's port is taken, before anything starts."""
    from gateway.local_cluster import environment, front_door_taken, private_token

    if (taken := front_door_taken(host, port)) is not None:
        said = os.strerror(taken.errno) if isinstance(taken.errno, int) and taken.errno > 0 else taken.strerror
        print(f"==> cannot listen on {host}:{port}: {said or taken}{_listen_hint(taken)}", file=sys.stderr, flush=True)
        return None
    local = environment(config.runtime, config.ingress.read_timeout_s, host)
    os.environ.update(local)
    private_token()
    return local


def _url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _tend_processes(config: GatewayConfig, address: str | None) -> None:
    """Pins the gateway's processes of a cluster this process started and
    lowers its background ones, then keeps doing so for processes started
    since (a replaced controller, a new model's replicas); returns only by
    raising (``_Stop`` when signalled)."""
    from gateway.affinity import lower_background, pin_gateway_processes, reserved_cpus

    cpus = reserved_cpus(config.runtime.gateway_cpus) if address is None else None
    if cpus:
        pinned = pin_gateway_processes(os.getpid(), cpus)
        print(f"==> {pinned} gateway processes pinned to CPUs {sorted(cpus)}", flush=True)
    # Only the processes of a cluster this process started.
    niceness = config.runtime.background_niceness if address is None else 0
    proxy = config.runtime.http_proxy == "haproxy"  # Serve's proxy is off the request path
    if niceness:
        lowered = lower_background(os.getpid(), niceness, proxy)
        print(f"==> {lowered} background processes at niceness {niceness}", flush=True)
    while True:
        time.sleep(PIN_EVERY_S if cpus or niceness else 3600)
        if cpus:
            pin_gateway_processes(os.getpid(), cpus)
        if niceness:
            lower_background(os.getpid(), niceness, proxy)


def _stop_serving(config: GatewayConfig, own_cluster: bool) -> None:
    """Drains the gateway's applications and leaves Ray. Serve itself is shut
    down only on a cluster this process started: on one it joined
    (``--address``), Serve's other applications are not the gateway's to end.

    On a cluster this process started, a Ctrl-C (SIGINT) during the drain
    cuts it short: the shutdown that follows ends every replica. One within
    ``AGAIN_AFTER_S`` of the drain's start is taken for a copy of the first
    stop (``pkill`` matches this process and the parent that forwards it),
    and a stop signal after it, or a SIGTERM at any time, is ignored. On a
    joined cluster the drain always runs whole: its removal must reach Serve."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    began = time.monotonic()

    def again(signum: int, _: FrameType | None) -> None:
        if time.monotonic() - began >= AGAIN_AFTER_S:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # (once)
            raise _Stop(signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGINT, again if own_cluster else signal.SIG_IGN)
        _drain(config, cut_short=own_cluster)
    except _Stop as stop:
        _say(f"==> {stop} again: shutting down without waiting; requests still in flight are cut off")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if own_cluster:
        serve.shutdown()
    ray.shutdown()


def _say(line: str) -> None:
    """Prints a line of the stop's progress; a terminal gone (hung up: EIO) stops nothing."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def _drain(config: GatewayConfig, cut_short: bool = False) -> None:
    """Removes the gateway's applications, letting requests in flight finish."""
    from gateway.deploy import grace_s, undeploy

    try:
        grace = grace_s(config)  # a `deploy` since the start may have lengthened it
    except Exception:  # noqa: BLE001 - Serve unreachable: the config's own
        grace = max([config.ingress.graceful_shutdown_s, *(m.graceful_shutdown_s for m in config.models)])
    again = "; Ctrl-C again stops without waiting" if cut_short else ""
    _say(f"==> letting requests in flight finish (at most {grace:.0f}s{again})")
    try:
        undeploy(config, timeout_s=grace + 30)
    except Exception as exc:  # noqa: BLE001 - stopping goes on: Serve's shutdown cuts the rest
        _say(f"==> requests in flight could not all finish: {exc}")


if __name__ == "__main__":
    sys.exit(main())

