"""Image sources in requests: which ones a server accepts, and fetching them.

A request can carry `data:` URLs (always accepted), `http(s)://` URLs (fetched with a timeout and a size cap,
unless fetching is off) and local paths / `file://` URLs — those only under `allowed_local_media_path`, as in
vLLM: a server must not read arbitrary files of its host because a client named them. For the same reason URLs
whose host resolves to a loopback, private, link-local or reserved address are refused (every redirect hop is
checked) unless `allow_private_urls`: a client must not make the server probe its own network. The connection goes
to the very address that passed the check (the URL's host is kept in the Host header and, for https, in SNI and the
certificate check), so a name whose DNS answer changes between the check and the fetch (DNS rebinding) cannot
reach a private address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin

import httpx

from step3vl.serve.protocol import RequestError


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    allowed_local_media_path: Path | None = None
    fetch_urls: bool = True
    fetch_timeout_s: float = 10.0  # for the whole download, not per read
    max_image_bytes: int = 32 << 20
    allow_private_urls: bool = False
    max_redirects: int = 5


async def resolve_images(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """Copies of the messages whose image parts carry loadable sources: bytes for fetched URLs, paths for
    allowed local files, data: URLs as they are. Raises RequestError naming the message and part. Anything that
    is not a list of messages is returned as it is, for the caller's own checks to name."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            content = [await _resolve_part(i, j, part, policy) for j, part in enumerate(content)]
            msg = {**msg, "content": content}
        out.append(msg)
    return out


async def _resolve_part(i: int, j: int, part: Any, policy: MediaPolicy) -> Any:
    if not isinstance(part, dict) or part.get("type") not in ("image_url", "image"):
        return part
    url = part.get("image_url") if part["type"] == "image_url" else part.get("image")
    url = url.get("url") if isinstance(url, dict) else url
    where = f"messages[{i}].content[{j}]"
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: an image part needs image_url.url (a data:, http(s):// or file URL)", where)
    if url.startswith("data:"):
        source: Any = url
    elif url.startswith(("http://", "https://")):
        source = await _fetch(url, where, policy)
    else:
        source = str(_local_path(url, where, policy))
    return {"type": "image", "image": source}


async def _fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    if not policy.fetch_urls:
        raise RequestError(f"{where}: fetching image URLs is disabled on this server; send a data: URL", where)
    try:
        return await asyncio.wait_for(_download(url, where, policy), policy.fetch_timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"{where}: could not fetch {url}: {type(e).__name__}: {e}", where) from None
    except asyncio.TimeoutError:
        raise RequestError(f"{where}: fetching {url} took over {policy.fetch_timeout_s} s", where) from None


async def _download(url: str, where: str, policy: MediaPolicy) -> bytes:
    async with httpx.AsyncClient(timeout=policy.fetch_timeout_s, follow_redirects=False) as client:
        for _ in range(policy.max_redirects + 1):
            target, headers, extensions = url, {}, {}
            if not policy.allow_private_urls:
                ip = await _check_public(url, where)
                target, headers, extensions = _pinned(url, ip)
            async with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers["location"])
                    continue
                resp.raise_for_status()
                return await _read_capped(resp, url, where, policy)
    raise RequestError(f"{where}: more than {policy.max_redirects} redirects fetching the image", where)


def _pinned(url: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, dict, dict]:
    """The request for `url` sent to `ip`: the URL with the address as its host, the name in the Host header,
    and for https the name as SNI (which the certificate is checked against)."""
    u = httpx.URL(url)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    headers = {"Host": u.netloc.decode("ascii").rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": u.host} if u.scheme == "https" else {}
    return str(u.copy_with(host=host.strip("[]"))), headers, extensions


async def _read_capped(resp: httpx.Response, url: str, where: str, policy: MediaPolicy) -> bytes:
    data = bytearray()
    async for chunk in resp.aiter_bytes():
        data += chunk
        if len(data) > policy.max_image_bytes:
            raise RequestError(f"{where}: image at {url} exceeds {policy.max_image_bytes} bytes", where)
    return bytes(data)


async def _resolve(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [addr[0].split("%", 1)[0] for *_, addr in infos]


async def _check_public(url: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to connect to: every address the host resolves to must be public (one private answer refuses
    the URL), and the first is the one used."""
    host = httpx.URL(url).host
    try:
        addresses = [ipaddress.ip_address(a) for a in await _resolve(host)]
    except (socket.gaierror, ValueError) as e:
        raise RequestError(f"{where}: cannot resolve the image host {host!r}: {e}", where) from None
    if not addresses:
        raise RequestError(f"{where}: the image host {host!r} has no address", where)
    for ip in addresses:
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast \
                or ip.is_unspecified:
            raise RequestError(f"{where}: the image host {host!r} is a private or local address; this server "
                               f"fetches public URLs only (--allow-private-urls to change that)", where)
    return addresses[0]


def _local_path(url: str, where: str, policy: MediaPolicy) -> Path:
    root = policy.allowed_local_media_path
    if root is None:
        raise RequestError(f"{where}: local image paths are not allowed on this server (start it with "
                           f"--allowed-local-media-path); send a data: URL", where)
    text = unquote(url.removeprefix("file://")) if url.startswith("file://") else url
    if "\x00" in text:  # the OS cannot open it; said here rather than as a ValueError deep in pathlib
        raise RequestError(f"{where}: a local image path cannot contain a NUL character", where)
    path = Path(text)
    path = (path if path.is_absolute() else root / path).resolve()  # relative: under the allowed root
    if not path.is_relative_to(root.resolve()):
        raise RequestError(f"{where}: {path} is outside the allowed media path {root}", where)
    return path
