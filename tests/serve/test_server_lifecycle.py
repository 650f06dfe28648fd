"""What a server owes its host: clients that leave free their KV at once; image URLs are fetched with limits;
local files are read only under the allowed directory."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from step3vl.engine import LLM, AsyncLLM
from step3vl.serve import MediaPolicy, OpenAIServer, ServerConfig
from step3vl.serve.background import BackgroundServer

MODEL = "tiny"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 480, "n": 16,
        "ignore_eos": True}


def _idle(srv: OpenAIServer, timeout: float = 20.0) -> tuple[bool, int]:
    deadline = time.monotonic() + timeout
    while True:
        busy, used = asyncio.run(srv.engine.call(lambda llm: (llm.has_unfinished_requests(),
                                                               llm.kv_stats()["blocks_used"])))
        if (not busy and used == 0) or time.monotonic() > deadline:
            return busy, used
        time.sleep(0.05)


def _aborted_choices(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("step3vl:choices_finished_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_closed_stream_aborts_its_request(server):
    srv, url = server
    before = _aborted_choices(url)
    with httpx.stream("POST", url + "/v1/chat/completions", json=LONG | {"stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert '"role": "assistant"' in first or '"role":"assistant"' in first
    assert _idle(srv) == (False, 0)
    deadline = time.monotonic() + 10
    while _aborted_choices(url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted_choices(url) == before + LONG["n"]  # the dropped stream's choices count, as aborts


def test_a_client_that_gives_up_aborts_its_request(server):
    srv, url = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=LONG, timeout=httpx.Timeout(60, read=0.3))
    assert _idle(srv) == (False, 0)


def _png(color, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server with /ok.png, /big.png (over the size cap) and /missing.png (404)."""
    files = {"/ok.png": _png((0, 90, 200)), "/big.png": _png((1, 2, 3)) + bytes(2 << 20)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path in ("/redirect", "/loop"):
                self.send_response(302)
                self.send_header("Location", "/ok.png" if self.path == "/redirect" else "/loop")
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files["/ok.png"]
    httpd.shutdown()


@pytest.fixture(scope="module")
def media_server(tiny_ckpt, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("media")
    Image.new("RGB", (24, 20), (0, 90, 200)).save(allowed / "ok.png")
    engine = AsyncLLM(LLM(tiny_ckpt, kv_cache_memory="8MiB", max_model_len=512))
    policy = MediaPolicy(allowed_local_media_path=allowed, max_image_bytes=1 << 20, allow_private_urls=True)
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, media=policy))
    with BackgroundServer(srv.app) as url:
        yield url, allowed
    engine.shutdown()


def _chat_with_image(url: str, image_url: str) -> httpx.Response:
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": "colour?"}]}]
    return httpx.post(url + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": msgs, "temperature": 0, "max_tokens": 5})


def test_url_file_and_data_url_give_the_same_answer(media_server, image_host):
    url, allowed = media_server
    host, png = image_host
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    answers = [_chat_with_image(url, src).json() for src in
               (data_url, host + "/ok.png", str(allowed / "ok.png"), f"file://{allowed / 'ok.png'}")]
    assert all("choices" in a for a in answers), answers
    assert len({a["usage"]["prompt_tokens"] for a in answers}) == 1
    assert len({(a["choices"][0]["message"]["content"], a["choices"][0]["message"]["reasoning_content"])
                for a in answers}) == 1


def test_redirects_are_followed(media_server, image_host):
    r = _chat_with_image(media_server[0], image_host[0] + "/redirect")
    assert r.status_code == 200, r.text


def test_the_default_policy_refuses_private_hosts(server, image_host):
    r = _chat_with_image(server[1], image_host[0] + "/ok.png")
    assert r.status_code == 400 and "private or local address" in r.json()["error"]["message"]


@pytest.mark.parametrize("path, words", [("/missing.png", "404"), ("/big.png", "exceeds 1048576 bytes"),
                                         ("/loop", "more than 5 redirects")])
def test_bad_urls_are_refused(media_server, image_host, path, words):
    r = _chat_with_image(media_server[0], image_host[0] + path)
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages[0].content[0]"


def test_files_outside_the_allowed_directory_are_refused(media_server):
    url, allowed = media_server
    r = _chat_with_image(url, str(allowed / ".." / "elsewhere.png"))
    assert r.status_code == 400 and "outside the allowed media path" in r.json()["error"]["message"]


def test_media_paths_resolve_under_the_allowed_root(media_server):
    url, allowed = media_server
    (allowed / "with space.png").write_bytes((allowed / "ok.png").read_bytes())
    for src in ("ok.png", f"file://{allowed}/with%20space.png"):
        r = _chat_with_image(url, src)
        assert r.status_code == 200, r.text


def test_a_nul_byte_in_a_local_path_is_a_400_naming_the_part(media_server):
    url, allowed = media_server
    for src in (str(allowed / "ok.png") + "\x00.png", f"file://{allowed}/ok.png%00.png"):
        r = _chat_with_image(url, src)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["message"] == "messages[0].content[0]: a local image path cannot contain a NUL character"
