"""The listener of SERVER_MODE=http: at most HTTP_MAX_CONNECTIONS open connections on PORT (cut to fit
RLIMIT_NOFILE: `connection_cap`); one more is answered `503 too_many_connections` with `Retry-After: 1` and closed
(never a reset nobody can explain). The listen backlog is LISTEN_BACKLOG. With PORT_HEALTH other than PORT, /ping's
own listener has HEALTH_CONNECTIONS more, so RunPod's health check gets through while PORT is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from aiohttp import web

from server.metrics import Metrics

log = logging.getLogger("server.http")

LISTEN_BACKLOG = 1024  # connections the kernel queues before accept (aiohttp's 128 drops SYNs under a burst)
HEALTH_CONNECTIONS = 64  # the PORT_HEALTH listener's own cap
FD_RESERVE = 64  # file descriptors kept for the model, logs, storage and the metrics endpoint
MAX_REFUSING = 64  # connections past the cap being answered 503 at once; more are reset (a flood: no fds left)
REFUSAL_LOG_EVERY_S = 10.0  # connections refused past the cap: one log line per this many seconds, with a count


def connection_cap(wanted: int, reserved: int = 0) -> int:
    """HTTP_MAX_CONNECTIONS, lowered to what RLIMIT_NOFILE leaves after FD_RESERVE, `reserved` (the health
    listener's) and MAX_REFUSING (the refusals' own sockets), so that the worker refuses connections before the
    kernel refuses it file descriptors."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = wanted if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE - reserved - MAX_REFUSING)
    if room < wanted:
        log.warning("HTTP_MAX_CONNECTIONS=%d lowered to %d to fit the open-files limit (%d)", wanted, room, soft)
    return min(wanted, room)


class CappedSite(web.TCPSite):
    """A TCPSite that holds at most `limit` connections open, answering one more `503 too_many_connections`
    before it closes it (never a reset nobody can explain), with the backlog LISTEN_BACKLOG."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limit: int, metrics: Metrics | None):
        super().__init__(runner, host, port, backlog=LISTEN_BACKLOG)
        self.limit = limit
        self.open = 0
        self._metrics = metrics
        self._refusing = 0
        self._refused_since_log = 0
        self._logged_at = -math.inf

    async def start(self) -> None:
        """TCPSite.start, with the capped protocol factory (and the count kept by aiohttp's close hook)."""
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        lost = server.connection_lost

        def connection_lost(handler, exc=None):  # aiohttp's Server hook: one of ours closed
            self.open -= 1
            lost(handler, exc)

        server.connection_lost = connection_lost
        self._server = await asyncio.get_running_loop().create_server(
            _Factory(server, self), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )  # fmt: skip
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    def protocol(self, server) -> asyncio.BaseProtocol:
        if self.open < self.limit:
            self.open += 1
            return server()
        self._note_refusal()
        return _Refusal(self)

    def _note_refusal(self) -> None:
        if self._metrics:
            self._metrics.http_refusals.labels(code="too_many_connections").inc()
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning("%d connection(s) refused since the last such line: %d open, HTTP_MAX_CONNECTIONS reached",
                        self._refused_since_log, self.open)  # fmt: skip
            self._logged_at, self._refused_since_log = now, 0


class _Factory:
    """The protocol factory handed to create_server: aiohttp's Server, through the site's cap."""

    def __init__(self, server, site: CappedSite):
        self._server = server
        self._site = site

    def __call__(self) -> asyncio.BaseProtocol:
        return self._site.protocol(self._server)


_REFUSAL_BODY = json.dumps({"error": {"message": "this worker has too many open connections (HTTP_MAX_CONNECTIONS); "
                                      "retry in 1 s", "type": "server_error", "param": None,
                                      "code": "too_many_connections"}}).encode()  # fmt: skip
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY)
REFUSAL_LINGER_S = 1.0  # a refused connection stays this long, reading (and dropping) what the client sends


class _Refusal(asyncio.Protocol):
    """A connection past the cap: answered 503 at once, then closed once the client has sent its request (or after
    REFUSAL_LINGER_S): closing with unread bytes would make the kernel send a reset instead of the answer."""

    def __init__(self, site: CappedSite):
        self._site = site
        self._transport = None
        self._timer = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._site._refusing += 1
        if self._site._refusing > MAX_REFUSING:
            transport.abort()
            return
        transport.write(_REFUSAL)
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc) -> None:
        self._site._refusing -= 1
        if self._timer is not None:
            self._timer.cancel()
