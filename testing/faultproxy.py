"""A reverse proxy on 127.0.0.1 that forwards to a target (the GCS emulator) and injects faults on demand.

    async with FaultProxy("http://127.0.0.1:4443") as proxy:
        proxy.url                                  # point STORAGE_EMULATOR_HOST here
        proxy.latency_s = 0.2                      # added before forwarding each request
        proxy.chunk_delay_s = 0.05                 # added between forwarded body chunks (a slow download)
        proxy.fail_next(2, status=503)             # the next 2 matching requests get 503
        proxy.reset_next(1)                        # the next one: connection reset before any response
        proxy.reset_next(1, after_bytes=4096)      # ... or after 4096 bytes of body
        proxy.delay_next(1, 2.0)                   # the next one waits 2 s before it is forwarded
        proxy.persistent_status = 500              # every request gets 500 until cleared
        proxy.count("GET", "/storage/v1/b/b/o/x")  # requests seen, by method and path (query ignored)
        proxy.clear()                              # no faults, no latency (counters kept)

Faults can be limited to paths containing a substring (`path_contains=`) and to a method. Counters record every
request that reached the proxy, faulted or not. `python -m testing.faultproxy --target URL --latency-ms 50` runs one
until Ctrl-C. The Host header is rewritten to the target's, so fake-gcs-server's `-public-host` still matches.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from testing.loopback import LoopbackApp

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass
class _Fault:
    kind: str  # "status" | "reset" | "delay"
    remaining: int
    status: int = 503
    delay_s: float = 0.0
    after_bytes: int = 0
    path_contains: str | None = None
    method: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.remaining > 0 and (self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path))


class FaultProxy:
    def __init__(self, target: str, *, port: int = 0, latency_ms: float = 0.0) -> None:
        self.target = target.rstrip("/")
        self.requested_port = port
        self.latency_s = latency_ms / 1000.0
        self.chunk_delay_s = 0.0
        self.persistent_status: int | None = None
        self.persistent_path_contains: str | None = None
        self.counts: Counter[tuple[str, str]] = Counter()
        self.log: list[tuple[str, str, int | str]] = []  # (method, path, status or "reset")
        self._faults: list[_Fault] = []
        self._server: LoopbackApp | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control -------------------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 503, *, path_contains: str | None = None,
                  method: str | None = None) -> None:
        self._faults.append(_Fault("status", n, status=status, path_contains=path_contains, method=method))

    def reset_next(self, n: int, after_bytes: int = 0, *, path_contains: str | None = None,
                   method: str | None = None) -> None:
        self._faults.append(_Fault("reset", n, after_bytes=after_bytes, path_contains=path_contains,
                                   method=method))

    def delay_next(self, n: int, seconds: float, *, path_contains: str | None = None,
                   method: str | None = None) -> None:
        self._faults.append(_Fault("delay", n, delay_s=seconds, path_contains=path_contains, method=method))

    def clear(self) -> None:
        self._faults.clear()
        self.persistent_status = None
        self.persistent_path_contains = None
        self.latency_s = 0.0
        self.chunk_delay_s = 0.0

    def count(self, method: str | None = None, path: str | None = None, *, contains: str | None = None) -> int:
        return sum(n for (m, p), n in self.counts.items()
                   if (method is None or m == method) and (path is None or p == path)
                   and (contains is None or contains in p))

    @property
    def pending_faults(self) -> int:
        return sum(f.remaining for f in self._faults)

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> FaultProxy:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._client = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        self._server = await LoopbackApp(app, port=self.requested_port, access_log=None,
                                         handler_cancellation=True).start()  # fmt: skip
        self.port = self._server.port
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- forwarding ----------------------------------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.rel_url.raw_path
        self.counts[(method, path)] += 1
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if self.persistent_status is not None and (
                self.persistent_path_contains is None or self.persistent_path_contains in path):
            self.log.append((method, path, self.persistent_status))
            return web.Response(status=self.persistent_status, text="injected persistent fault\n")
        fault = self._take_fault(method, path)
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
            fault = None
        if fault is not None and fault.kind == "status":
            self.log.append((method, path, fault.status))
            return web.Response(status=fault.status, text="injected fault\n")
        body = await request.read()
        if fault is not None and fault.after_bytes <= 0:
            self.log.append((method, path, "reset"))
            return self._reset(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        assert self._client is not None
        async with self._client.request(method, self.target + request.rel_url.raw_path_qs, headers=headers,
                                        data=body if body else None, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if fault is not None:
                    room = fault.after_bytes - sent
                    if room <= len(chunk):
                        await response.write(chunk[:room])
                        self.log.append((method, path, "reset"))
                        return self._reset(request, response)
                if self.chunk_delay_s > 0:
                    await asyncio.sleep(self.chunk_delay_s)
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            self.log.append((method, path, upstream.status))
            return response

    @staticmethod
    def _reset(request: web.Request, response: web.StreamResponse | None = None) -> web.StreamResponse:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed or reset peer would."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        return response if response is not None else web.Response(status=500)


async def _serve(args: argparse.Namespace) -> None:
    proxy = FaultProxy(args.target, port=args.port, latency_ms=args.latency_ms)
    if args.fail:
        proxy.fail_next(args.fail, status=args.fail_status)
    if args.resets:
        proxy.reset_next(args.resets)
    proxy.persistent_status = args.persistent_status
    async with proxy:
        print(f"fault proxy on {proxy.url} -> {proxy.target}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            print(dict(proxy.counts), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reverse proxy with injectable faults (127.0.0.1 only).")
    parser.add_argument("--target", required=True, help="base URL to forward to, e.g. http://127.0.0.1:4443")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every request")
    parser.add_argument("--fail", type=int, default=0, help="fail the first N requests with --fail-status")
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--resets", type=int, default=0, help="reset the connection of the first N requests")
    parser.add_argument("--persistent-status", type=int, default=None, help="answer every request with it")
    args = parser.parse_args(argv)
    if urlsplit(args.target).scheme not in ("http", "https"):
        parser.error("--target must be an http(s) URL")
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
