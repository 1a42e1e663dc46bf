"""uvicorn as `duospec serve` runs it: bounded heads, deadlines for slow clients, a connection cap.

uvicorn itself bounds a request head's size (h11_max_incomplete_event_size), idle keep-alive
connections (timeout_keep_alive) and concurrent connections (limit_concurrency, 503 beyond), but sets
no deadline on a request that is being sent: a connection that trickles its head a byte at a time, or
declares a body it never sends, stays open for ever. DeadlineProtocol adds the deadlines:

- the head must be complete within --request-timeout of the connection opening (or of the next
  request's first byte): else a 408 and the connection closes;
- the body must be complete within --request-timeout of the head: the completion handlers read it
  under that deadline and answer 408 (app.py); for routes that do not read a body, and as a backstop,
  the connection closes BODY_GRACE_SECONDS later.
The model's time is not bounded here: once a request has arrived whole, its answer takes what it takes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from duospec.server.logs import install_log_escaping

KEEP_ALIVE_SECONDS = 5  # an idle connection between requests closes after this (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; more is a 400 (uvicorn's default, made explicit)
BODY_GRACE_SECONDS = 2.0  # the handlers' own 408 comes first; then the connection is closed regardless
log = logging.getLogger("duospec.server")


def uvicorn_config(app, settings, **options):
    """uvicorn.Config for `app` with the server's connection limits, and escaped logs (see logs.py)."""
    import uvicorn

    state = app.state.duospec
    config = uvicorn.Config(
        app,
        http=deadline_protocol(settings.request_timeout, lambda: state.metrics.count_request("other", 408)),
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        limit_concurrency=settings.max_connections,
        **{"log_level": "warning", "access_log": False, "lifespan": "on", **options},
    )
    install_log_escaping()  # after Config: it (re)configures uvicorn's loggers
    return config


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    head = f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def deadline_protocol(seconds: float, on_timeout: Callable[[], None] = lambda: None) -> type:
    """uvicorn's h11 protocol with the deadlines above (a class: uvicorn makes one per connection)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        _timer = None
        _phase: str | None = None  # "head" (waiting for it), "body" (the head came; the body is due) or None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm("head", seconds)

        def data_received(self, data: bytes) -> None:
            if self._phase is None and self.conn.their_state is h11.IDLE:
                self._arm("head", seconds)  # the first bytes of a request after a keep-alive pause
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:
                self._disarm()  # the next request has not begun; uvicorn's keep-alive timer runs
            self._follow()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow(self) -> None:
            """Move the deadline along with the client's side of the HTTP exchange."""
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", seconds + BODY_GRACE_SECONDS)
            elif state is not h11.IDLE or self._phase == "body":
                self._disarm()  # the request arrived whole (or the connection is ending)

        def _arm(self, phase: str, delay: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(delay, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expire(self) -> None:
            phase, self._timer, self._phase = self._phase, None, None
            if self.transport.is_closing():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            on_timeout()
            if phase == "head":
                message = f"the request head did not arrive within {seconds:g} s (--request-timeout)"
                self.transport.write(_timeout_response(message))
            else:
                message = f"the request body did not arrive within {seconds:g} s of its head (--request-timeout)"
            log.info("- %s 408 request_timeout: %s; connection closed", client, message)
            self.transport.close()

    return DeadlineProtocol
