"""Nothing of the local default listens beyond this machine."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import psutil

from gateway.config import RuntimeConfig
from tests.integration.conftest import Gateway


def _loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_every_socket_the_gateway_listens_on_is_loopback(gateway: Gateway) -> None:
    me = psutil.Process(os.getpid())
    processes = [me, *me.children(recursive=True)]  # Ray's daemons, workers, replicas, engines, HAProxy
    listening: list[tuple[str, str, int]] = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                listening.append((name, connection.laddr.ip, connection.laddr.port))
    names = {name for name, _, _ in listening}
    # The test is only worth something if it saw the listeners it guards.
    assert {"gcs_server", "raylet", "haproxy"} <= names, names
    assert any(name.startswith("ray::ServeRepli") for name in names), names
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_haproxy_runs_the_threads_its_setting_resolves_to(gateway: Gateway) -> None:
    """More HAProxy threads than the host can spare compete with the engine's threads."""
    me = psutil.Process(os.getpid())
    haproxy = [p for p in me.children(recursive=True) if p.name() == "haproxy"]
    assert haproxy, "no HAProxy under the test session's cluster"
    expected = int(os.environ["RAY_SERVE_HAPROXY_NBTHREAD"])
    assert expected == RuntimeConfig().haproxy_thread_count()
    assert {p.num_threads() for p in haproxy} == {expected}


def test_haproxys_admin_socket_and_config_are_in_a_directory_only_this_user_enters(gateway: Gateway) -> None:
    """Ray Serve's admin socket takes any command (mode 666, level admin): whoever
    may reach it could take the ingress out of the front door or redirect it."""
    me = psutil.Process(os.getpid())
    haproxy = [p for p in me.children(recursive=True) if p.name() == "haproxy"]
    assert haproxy, "no HAProxy under the test session's cluster"
    private = Path(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]).parent
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    for process in haproxy:
        command = process.cmdline()
        config = Path(command[command.index("-f") + 1])
        assert private in config.parents, config
        sockets = [line.split()[2] for line in config.read_text().splitlines() if line.strip().startswith("stats socket")]
        assert sockets and all(private in Path(path).parents for path in sockets), sockets
        assert all(Path(path).is_socket() for path in sockets)
