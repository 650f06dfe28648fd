"""uvicorn's HTTP/1.1 protocol with a header timeout: a connection that does not complete a request's headers
within `header_timeout_s` of connecting (or of the first byte of a later request on the same connection) gets a
408 and is closed.

uvicorn times out only the idle gap between two requests of a keep-alive connection (`timeout_keep_alive`); a
client that connects and sends nothing, or trickles its headers a byte at a time (slowloris), would hold its
connection, its file descriptor and its buffers for as long as it likes. The body of a request is timed by the
app (BodyLimit in server.py), once its headers are in.
"""

from __future__ import annotations

import asyncio

HEADER_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0  # uvicorn's and vLLM's default for --timeout-keep-alive
_TIMEOUT_BODY = b"request headers not received in time\n"
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S) -> type:
    """The protocol class for uvicorn's `http=` option, with this header timeout (uvicorn and h11 are imported
    here, not with the module: the CLI reads HEADER_TIMEOUT_S while building `--help`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if not seconds > 0:
        raise ValueError(f"header timeout {seconds!r}: must be > 0 seconds")

    class HeaderTimeoutProtocol(H11Protocol):
        header_timeout_s = float(seconds)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of a later request on a kept-alive connection start its clock
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # headers complete: the body is the app's to time

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(TIMEOUT_RESPONSE)
                self.transport.close()

    return HeaderTimeoutProtocol
