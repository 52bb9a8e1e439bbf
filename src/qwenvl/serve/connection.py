"""The server's HTTP connections: uvicorn's h11 protocol with a deadline for each request's head.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but a new connection
that sends nothing, or sends its request line and headers a byte at a time, is kept open for as long as the
client likes (any byte received cancels the keep-alive timer): a few hundred such connections use up the
process's file descriptors and nobody else is answered (slowloris). Here every request's head (request line and
headers) must arrive within ``head_timeout`` seconds of the connection opening or of the previous response
ending; a connection whose head is late is closed. Once the head is in, the body has the app's own time limit
(``ServeSettings.request_body_timeout``) and the answer as long as it takes.

Connections that send nothing still each hold a file descriptor until their deadline: a client opening more of
them than the process may have open files (``ulimit -n``, often 1024) stopped ``accept()`` for everyone
(uvicorn's ``limit_concurrency`` answers 503 to requests, but accepts and keeps every connection). So at most
``max_connections`` are kept open: one more closes the oldest connection waiting for a request head (else
itself, when every connection is in a request).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeadDeadlineProtocol", "open_files_limit", "server_config"]

logger = logging.getLogger(__name__)


class HeadDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request head has not arrived within ``head_timeout``
    seconds (from the connection's start, or from the end of its previous response), and, past
    ``max_connections`` open ones, the oldest connection waiting for a head (``waiting``: those connections, oldest
    first, shared by the server's connections)."""

    def __init__(self, *args: Any, head_timeout: float, max_connections: int | None = None,
                 waiting: dict[HeadDeadlineProtocol, None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout, self.max_connections = head_timeout, max_connections
        self.waiting = {} if waiting is None else waiting
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            oldest = next(iter(self.waiting), self)
            logger.debug("%d connections open, more than max_connections: closing %s", len(self.connections),
                         "the oldest one waiting for a request" if oldest is not self else "the new one")
            oldest._close()
            if oldest is self:
                return
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
            self.waiting[self] = None

    def _cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        self.waiting.pop(self, None)

    def _head_late(self) -> None:
        self.head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closing the connection from %s: no request head within %g s", client, self.head_timeout)
            self._close()

    def _close(self) -> None:
        self._cancel_deadline()
        self.connections.discard(self)  # counted out now: connection_lost comes on a later turn of the loop
        self.transport.close()


def open_files_limit(target: int = 65535) -> int:
    """The process's limit of open files (each connection takes one), its soft limit raised first as far as
    ``target`` allows within the hard limit, as vLLM's server does (the soft limit is often 1024)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return target
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            logger.warning("could not raise the open-files limit from %d to %d: %s", soft, want, e)
    return target if soft == resource.RLIM_INFINITY else soft


def server_config(app: Any, head_timeout: float, max_connections: int | None = None, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for serving ``app`` over :class:`HeadDeadlineProtocol`, keeping at most ``max_connections``
    connections open (None: no bound; ``kwargs``: uvicorn.Config's)."""
    protocol = functools.partial(HeadDeadlineProtocol, head_timeout=head_timeout, max_connections=max_connections,
                                 waiting={})
    return uvicorn.Config(app, http=protocol, **kwargs)  # type: ignore[arg-type]
