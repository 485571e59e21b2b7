"""Nothing of the local default listens beyond this machine."""

from __future__ import annotations

import ipaddress
import os

import psutil

from tests.integration.conftest import INGRESS_REPLICAS, Gateway


def _loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_every_socket_the_gateway_listens_on_is_loopback(gateway: Gateway) -> None:
    me = psutil.Process(os.getpid())
    processes = [me, *me.children(recursive=True)]  # Ray's daemons, workers, replicas, engines
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
    assert {"gcs_server", "raylet"} <= names, names
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # The front door is the ingress replicas themselves, no proxy: each on its port with a socket
    # of its own and the one this session keeps for them, as `llm-gateway serve` does.
    port = int(gateway.base_url.rsplit(":", 1)[1])
    front = sorted((name[:15], host) for name, host, bound in listening if bound == port)
    kept = [(me.name()[:15], "127.0.0.1")]
    assert front == sorted(kept + [("ray::ServeRepli", "127.0.0.1")] * 2 * INGRESS_REPLICAS), front
    assert not {"haproxy", "ray::ProxyActor"} & {p.name() for p in processes if p.is_running()}
