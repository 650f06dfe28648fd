"""Image URLs are fetched from the very address that passed the private-address check (DNS rebinding): with a
resolver that answers a public address first and loopback afterwards, the request still goes to the public one,
with the URL's name in the Host header (and SNI for https); every redirect hop is resolved, checked and pinned."""

from __future__ import annotations

import asyncio
import functools

import httpx
import pytest

from step3vl.serve import media
from step3vl.serve.media import MediaPolicy
from step3vl.serve.protocol import RequestError

PUBLIC, OTHER_PUBLIC, LOOPBACK = "93.184.216.34", "151.101.1.69", "127.0.0.1"


def _rebinding_resolver(answers: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str) -> list[str]:
        calls.append(host)
        seq = answers[host]
        return [seq[min(len(calls) - 1, len(seq) - 1)]]  # a different answer on each call
    return resolve, calls


def _fetch(url: str) -> bytes:
    return asyncio.run(media._fetch(url, "messages[0].content[0]", MediaPolicy()))


def test_the_fetch_goes_to_the_checked_address(monkeypatch):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"image bytes")

    resolve, calls = _rebinding_resolver({"img.example": [PUBLIC, LOOPBACK, LOOPBACK]})
    monkeypatch.setattr(media, "_resolve", resolve)
    monkeypatch.setattr(media.httpx, "AsyncClient",
                        functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(handler)))
    assert _fetch("https://img.example:8443/a.png?x=1") == b"image bytes"
    (req,) = seen
    assert calls == ["img.example"]  # resolved once: nothing re-resolves the name after the check
    assert req.url.host == PUBLIC and req.url.port == 8443 and req.url.path == "/a.png" and req.url.query == b"x=1"
    assert req.headers["host"] == "img.example:8443" and req.extensions["sni_hostname"] == "img.example"


def test_each_redirect_hop_is_resolved_checked_and_pinned(monkeypatch):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers["host"] == "first.example":
            return httpx.Response(302, headers={"location": "http://second.example/img.png"})
        return httpx.Response(200, content=b"ok")

    resolve, _ = _rebinding_resolver({"first.example": [PUBLIC], "second.example": [OTHER_PUBLIC]})
    monkeypatch.setattr(media, "_resolve", resolve)
    monkeypatch.setattr(media.httpx, "AsyncClient",
                        functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(handler)))
    assert _fetch("http://first.example/start") == b"ok"
    assert [(r.url.host, r.headers["host"]) for r in seen] == [(PUBLIC, "first.example"),
                                                                (OTHER_PUBLIC, "second.example")]
    # A hop whose name answers loopback is refused before any connection to it.
    resolve, _ = _rebinding_resolver({"first.example": [PUBLIC], "second.example": [LOOPBACK]})
    monkeypatch.setattr(media, "_resolve", resolve)
    seen.clear()
    with pytest.raises(RequestError, match="'second.example' is a private or local address"):
        _fetch("http://first.example/start")
    assert [r.headers["host"] for r in seen] == ["first.example"]
