"""Connection timeouts of `step3vl serve`'s HTTP layer (serve/http_protocol.py): a connection that sends nothing,
or trickles its request head, gets a 408 and is closed once the header timeout passes; a request whose head came
in time is not cut however slowly its body follows (that is the app's body timeout); an idle keep-alive
connection is closed after timeout_keep_alive. Checked on raw sockets against a minimal ASGI app."""

from __future__ import annotations

import socket
import time

import pytest

from step3vl.serve.background import BackgroundServer
from step3vl.serve.http_protocol import header_timeout_protocol

HEADER_TIMEOUT = 0.6


async def echo(scope, receive, send):
    """Answers every request with the number of body bytes it received."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def url():
    with BackgroundServer(echo, header_timeout_s=HEADER_TIMEOUT, timeout_keep_alive_s=0.5) as u:
        yield u


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def _read_response(sock: socket.socket) -> bytes:
    """One response of a kept-alive connection: its head, then content-length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_a_silent_connection_gets_a_408_and_is_closed(url):
    sock = _connect(url)
    t0 = time.monotonic()
    reply = _read_all(sock)  # returns when the server closes the connection
    waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request headers not received in time" in reply
    assert HEADER_TIMEOUT * 0.8 < waited < HEADER_TIMEOUT + 3


def test_a_trickled_request_head_is_cut_off(url):
    sock = _connect(url)
    t0 = time.monotonic()
    head = b"GET /x HTTP/1.1\r\nhost: a\r\nx-slow: " + b"y" * 40
    sent = 0
    try:
        for i in range(len(head)):  # one byte every 50 ms: ~2 s for the whole head, never finished
            sock.sendall(head[i:i + 1])
            sent += 1
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - t0 < HEADER_TIMEOUT + 3 and sent < len(head)


def test_a_slow_body_after_a_timely_head_is_not_cut(url):
    sock = _connect(url)
    sock.sendall(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\nconnection: close\r\n\r\nab")
    time.sleep(HEADER_TIMEOUT * 2)  # longer than the header timeout, well within the app's body timeout
    sock.sendall(b"cd")
    reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n4")


def test_keep_alive_requests_each_get_the_full_header_timeout_and_idle_ones_are_closed(url):
    sock = _connect(url)
    for _ in range(3):  # each request comes well inside the timeouts, on one kept-alive connection
        time.sleep(0.3)
        sock.sendall(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
    t0 = time.monotonic()
    assert _read_all(sock) == b""  # then idle: uvicorn's keep-alive timeout closes it without a reply
    assert time.monotonic() - t0 < 3


def test_the_timeout_must_be_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        header_timeout_protocol(0)
