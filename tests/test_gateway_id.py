"""A gateway's default id: its container's name under Docker, host name and pid elsewhere.

The reverse lookup is tested against a small DNS server on loopback that answers as Docker's
embedded one does (``<container>.<network>`` for a container's address); the choice between
the two ids is tested with the lookup replaced.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import config
from gateway.config import default_gateway_id, reverse_lookup

DOCKER_RESOLV_CONF = "nameserver 127.0.0.11\noptions ndots:0\n"
HOST_RESOLV_CONF = "# a host's own\nnameserver 192.0.2.53\nsearch example.org\n"

Answer = Callable[[bytes], bytes]


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"


def ptr_answer(name: str, compressed: bool = False) -> Answer:
    """Answers a query with one PTR record for ``name``; ``compressed``: the record's data
    is a pointer to the name, written after it (where an additional record would be)."""

    def answer(query: bytes) -> bytes:
        (query_id,) = struct.unpack("!H", query[:2])
        question = query[12:]
        if compressed:
            # header, question, the record (name pointer, type..length, 2-byte data), name
            name_at = 12 + len(question) + 2 + 10 + 2
            rdata = struct.pack("!H", 0xC000 | name_at)
            extra = encode_name(name)
        else:
            rdata, extra = encode_name(name), b""
        record = struct.pack("!HHHIH", 0xC00C, 12, 1, 600, len(rdata)) + rdata
        header = struct.pack("!HHHHHH", query_id, 0x8180, 1, 1, 0, 0)
        return header + question + record + extra

    return answer


def nxdomain(query: bytes) -> bytes:
    return query[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + query[12:]


def wrong_id(query: bytes) -> bytes:
    reply = ptr_answer("x.net")(query)
    return bytes([reply[0] ^ 0xFF]) + reply[1:]


@pytest.fixture
def dns_server() -> Iterator[Callable[[Answer], tuple[str, int]]]:
    """A one-query DNS server on loopback, answering with the function given."""
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(answer: Answer) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sockets.append(sock)

        def serve() -> None:
            try:
                query, peer = sock.recvfrom(512)
            except OSError:
                return
            assert query[-4:] == struct.pack("!HH", 12, 1), "not a PTR query in class IN"
            sock.sendto(answer(query), peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        address: tuple[str, int] = sock.getsockname()
        return address

    yield start
    for sock in sockets:
        sock.close()
    for thread in threads:
        thread.join(5)


def test_reverse_lookup_asks_for_the_address_and_takes_the_first_label(
    dns_server: Callable[[Answer], tuple[str, int]],
) -> None:
    """The query names the address reversed under in-addr.arpa; the id is the container's
    name, the first label of Docker's answer `<container>.<network>`."""
    seen: list[bytes] = []

    def answer(query: bytes) -> bytes:
        seen.append(query)
        return ptr_answer("chat-service-gateway-2.chat-service_default.")(query)

    server = dns_server(answer)
    assert reverse_lookup("172.18.0.5", server) == "chat-service-gateway-2"
    assert encode_name("5.0.18.172.in-addr.arpa") in seen[0]


def test_reverse_lookup_follows_a_compressed_name(
    dns_server: Callable[[Answer], tuple[str, int]],
) -> None:
    """An answer whose name is a compression pointer reads the same."""
    server = dns_server(ptr_answer("chat-service-gateway-11.chat-service_default", True))
    assert reverse_lookup("172.18.0.9", server) == "chat-service-gateway-11"


def test_reverse_lookup_of_an_unknown_address_is_none(
    dns_server: Callable[[Answer], tuple[str, int]],
) -> None:
    assert reverse_lookup("172.18.0.77", dns_server(nxdomain)) is None


def test_reverse_lookup_rejects_an_answer_to_another_query(
    dns_server: Callable[[Answer], tuple[str, int]],
) -> None:
    with pytest.raises(ValueError):
        reverse_lookup("172.18.0.5", dns_server(wrong_id))


def test_reverse_lookup_gives_up_on_a_silent_server() -> None:
    """Bounded: nobody answering is an OSError (a timeout) after the timeout given."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            reverse_lookup("172.18.0.5", silent.getsockname(), timeout=0.2)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return path


def test_in_a_docker_container_the_id_is_the_container_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker's embedded DNS in resolv.conf: the container's own address (from its host
    name) is looked up there, and the name is the id."""
    asked: list[tuple[str, tuple[str, int]]] = []

    def lookup(address: str, server: tuple[str, int]) -> str:
        asked.append((address, server))
        return "chat-service-gateway-3"

    monkeypatch.setattr(config, "reverse_lookup", lookup)
    monkeypatch.setattr(socket, "gethostname", lambda: "284c69c0fb2a")
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "172.18.0.7")
    assert default_gateway_id(write(tmp_path, DOCKER_RESOLV_CONF)) == "chat-service-gateway-3"
    assert asked == [("172.18.0.7", ("127.0.0.11", 53))]


@pytest.mark.parametrize("failure", [OSError("timed out"), ValueError("malformed"), None])
def test_without_an_answer_the_id_is_host_name_and_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception | None
) -> None:
    """No answer, a bad one, or no name for the address: host name and pid, as before."""

    def lookup(address: str, server: tuple[str, int]) -> str | None:
        if failure is not None:
            raise failure
        return None

    monkeypatch.setattr(config, "reverse_lookup", lookup)
    monkeypatch.setattr(socket, "gethostname", lambda: "284c69c0fb2a")
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "172.18.0.7")
    expected = f"284c69c0fb2a-{os.getpid()}"
    assert default_gateway_id(write(tmp_path, DOCKER_RESOLV_CONF)) == expected


@pytest.mark.parametrize("resolv_conf", [HOST_RESOLV_CONF, None])
def test_outside_docker_no_query_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolv_conf: str | None
) -> None:
    """Any other resolver (or none): host name and pid, and no DNS query leaves the host."""

    def lookup(address: str, server: tuple[str, int]) -> str:
        raise AssertionError("a reverse lookup outside Docker")

    monkeypatch.setattr(config, "reverse_lookup", lookup)
    path = write(tmp_path, resolv_conf) if resolv_conf else tmp_path / "missing"
    assert default_gateway_id(path) == f"{socket.gethostname()}-{os.getpid()}"
