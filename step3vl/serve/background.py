"""Run a server app on a background thread of this process (embedding, tests, benchmarks)."""

from __future__ import annotations

import threading
import time

import uvicorn

from step3vl.serve.http_protocol import HEADER_TIMEOUT_S, KEEP_ALIVE_S, header_timeout_protocol


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on 127.0.0.1 (a free port unless given) until the block
    ends; `url` is the base URL, e.g. http://127.0.0.1:41234."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout_s: float = 30.0, header_timeout_s: float = HEADER_TIMEOUT_S,
                 timeout_keep_alive_s: float = KEEP_ALIVE_S):
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                     http=header_timeout_protocol(header_timeout_s),
                                                     timeout_keep_alive=timeout_keep_alive_s))
        self._thread = threading.Thread(target=self._server.run, name="step3vl-http", daemon=True)
        self._timeout = start_timeout_s
        self.url: str | None = None

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (port in use?)")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
