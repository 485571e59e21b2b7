"""Nothing of the local default listens beyond this machine."""

from __future__ import annotations

import ipaddress
import os

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
