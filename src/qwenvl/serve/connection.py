"""The server's HTTP connections: uvicorn's h11 protocol with a deadline for each request's head.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but a new connection
that sends nothing, or sends its request line and headers a byte at a time, is kept open for as long as the
client likes (any byte received cancels the keep-alive timer): a few hundred such connections use up the
process's file descriptors and nobody else is answered (slowloris). Here every request's head (request line and
headers) must arrive within ``head_timeout`` seconds of the connection opening or of the previous response
ending; a connection whose head is late is closed. Once the head is in, the body has the app's own time limit
(``ServeSettings.request_body_timeout``) and the answer as long as it takes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeadDeadlineProtocol", "server_config"]

logger = logging.getLogger(__name__)


class HeadDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request head has not arrived within ``head_timeout``
    seconds (from the connection's start, or from the end of its previous response)."""

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is in (h11 is reading the body, or has read it)
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may read a pipelined request's head at once
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_deadline()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.head_deadline = self.loop.call_later(self.head_timeout, self._head_late)

    def _cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_late(self) -> None:
        self.head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closing the connection from %s: no request head within %g s", client, self.head_timeout)
            self.transport.close()


def server_config(app: Any, head_timeout: float, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for serving ``app`` over :class:`HeadDeadlineProtocol` (``kwargs``: uvicorn.Config's)."""
    protocol = functools.partial(HeadDeadlineProtocol, head_timeout=head_timeout)
    return uvicorn.Config(app, http=protocol, **kwargs)  # type: ignore[arg-type]
