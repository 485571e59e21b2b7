"""gateway/http/front_door_socket.py: the listening socket a local cluster's
starting process keeps on the front door's port, with real sockets and
real front doors (uvicorn) on loopback. Replicas accept from the kept
socket besides their own; a client who connects while no replica is up
waits and is answered by the next one; processes of another user get
nothing."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from gateway.http import front_door_socket
from gateway.http.front_door import FrontDoor
from gateway.http.front_door_socket import KEEPER_VARIABLE, SocketKeeper, keeper_name, kept_socket
from gateway.local_cluster import free_port

REQUEST = b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b"hello"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


async def answer_to(sock: socket.socket) -> bytes:
    """What the front door answers a request already sent on ``sock``, to its close."""

    def read() -> bytes:
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return answer

    return await asyncio.wait_for(asyncio.to_thread(read), 10)


@pytest.fixture
def keeper(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A keeper, named in this process's environment as in a local cluster's processes."""
    name = keeper_name()
    monkeypatch.setenv(KEEPER_VARIABLE, name)
    keeper = SocketKeeper("127.0.0.1", free_port(), name)
    yield keeper
    keeper.close()


async def test_every_front_door_accepts_from_the_kept_socket_too(keeper: SocketKeeper) -> None:
    doors = [FrontDoor(app, "127.0.0.1", keeper.port, read_timeout_s=5) for _ in range(2)]
    for door in doors:
        await door.start()
    try:
        for door in doors:  # its own socket on the port, and the kept one
            own, kept = door._sockets
            assert inode(kept) == inode(keeper.socket) != inode(own)
            assert own.getsockname() == keeper.socket.getsockname()
        for _ in range(8):  # whichever socket the kernel picks, an answer
            with socket.create_connection(("127.0.0.1", keeper.port)) as client:
                client.sendall(REQUEST)
                assert (await answer_to(client)).startswith(b"HTTP/1.1 200 OK")
    finally:
        for door in doors:
            await door.stop(1)


async def test_a_client_who_connects_between_replicas_waits_for_the_next(keeper: SocketKeeper) -> None:
    first = FrontDoor(app, "127.0.0.1", keeper.port, read_timeout_s=5)
    await first.start()
    await first.stop(1)
    # No replica holds the socket now: the connection waits in its queue, not refused.
    with socket.create_connection(("127.0.0.1", keeper.port), timeout=10) as client:
        client.sendall(REQUEST)
        second = FrontDoor(app, "127.0.0.1", keeper.port, read_timeout_s=5)
        await second.start()
        try:
            answer = await answer_to(client)
        finally:
            await second.stop(1)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b"\r\n\r\nhello")


def test_no_keeper_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEEPER_VARIABLE, raising=False)
    assert kept_socket(free_port()) is None  # a cluster started otherwise
    monkeypatch.setenv(KEEPER_VARIABLE, keeper_name())
    assert kept_socket(free_port()) is None  # its keeper gone


def test_each_keeper_has_a_name_of_its_own() -> None:
    assert len({keeper_name() for _ in range(100)}) == 100


def test_the_keeper_gives_nothing_to_another_user(keeper: SocketKeeper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_door_socket, "peer_uid", lambda conn: os.getuid() + 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect("\0" + os.environ[KEEPER_VARIABLE])
        data, fds, _, _ = socket.recv_fds(conn, 1, 1)
    assert (data, fds) == (b"", [])
    # And a keeper of another user is not taken at its word.
    assert kept_socket(keeper.port) is None


def test_what_the_keeper_hands_over_is_its_socket(keeper: SocketKeeper) -> None:
    with pytest.raises(OSError, match="another socket"):  # asked for another port's
        kept_socket(free_port())
    sock = kept_socket(keeper.port)
    assert sock is not None
    with sock:
        assert inode(sock) == inode(keeper.socket)
        assert sock.get_inheritable() is False


def test_a_closed_keeper_is_gone(keeper: SocketKeeper) -> None:
    port = keeper.port
    keeper.close()
    assert kept_socket(port) is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_any_ipv6_address_takes_ipv4_too_whatever_the_systems_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where net.ipv6.bindv6only is 1, a socket on `::` took IPv6 clients only.
    from gateway.http import front_door_socket
    from gateway.http.front_door_socket import tcp_socket

    class V6OnlyByDefault(socket.socket):  # (that system's default)
        def __init__(self, family: int = -1, kind: int = -1) -> None:
            super().__init__(family, kind)
            if family == socket.AF_INET6:
                self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)

    monkeypatch.setattr(front_door_socket.socket, "socket", V6OnlyByDefault)
    with tcp_socket("::") as any_address, tcp_socket("[::]") as bracketed, tcp_socket("::1") as loopback:
        assert any_address.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert bracketed.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert loopback.family == socket.AF_INET6
    with tcp_socket("127.0.0.1") as v4:
        assert v4.family == socket.AF_INET
