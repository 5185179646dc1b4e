"""Loopback plumbing for tests and benchmarks: free ports, an aiohttp app served on 127.0.0.1, and a server
process that is waited on until its URL answers and is always stopped, its whole process group with it.

    async with LoopbackApp(app) as server:          # app: an aiohttp web.Application
        server.url                                   # "http://127.0.0.1:PORT"

    with ServerProcess([binary, ...], log_path, what="prometheus") as server:
        server.wait_ready(f"http://127.0.0.1:{port}/-/ready", timeout_s=60)
        ...                                          # SIGTERM, then SIGKILL, to its group at the end
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on right now (another process may still take it before the caller binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float, *, what: str,
                  log_tail: Callable[[], str] = lambda: "", interval_s: float = 0.25) -> None:
    """Wait until `url` answers 200 while `process` (the server behind it) runs; RuntimeError, with the
    server's log tail, when it exits first or does not answer within `timeout_s`."""  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting:\n{log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout_s:g} s:\n{log_tail()}")
        time.sleep(interval_s)


class LoopbackApp:
    """An aiohttp application served on `host` (127.0.0.1) at `port` (0: a free one, known after `start()`).
    `runner_options` go to aiohttp's AppRunner (access_log=None, shutdown_timeout=..., ...)."""

    def __init__(self, app: web.Application, *, host: str = LOOPBACK, port: int = 0, **runner_options: Any):
        self.app = app
        self.host = host
        self.port = port
        self._runner_options = runner_options
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> LoopbackApp:
        runner = web.AppRunner(self.app, **self._runner_options)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> LoopbackApp:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class ServerProcess:
    """A server command in a process group of its own (stdin closed), its output in `log_path`. `stop()` sends the
    whole group SIGTERM, then SIGKILL after `stop_timeout_s`, so children the server started go with it."""

    def __init__(self, argv: Sequence[str | os.PathLike], log_path: str | os.PathLike, *,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 what: str | None = None, stop_timeout_s: float = 20.0) -> None:  # fmt: skip
        self.argv = [str(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.env = None if env is None else dict(env)
        self.cwd = None if cwd is None else str(cwd)
        self.what = what or Path(self.argv[0]).name
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.what} was never started")
        return self.process.pid

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._stopped = False
        return self

    def log_tail(self, chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text if len(text) <= chars else "...\n" + text[-chars:]

    def wait_ready(self, url: str, timeout_s: float, *, interval_s: float = 0.25) -> None:
        """Wait until `url` answers 200 (see `wait_for_http`); RuntimeError with the log tail otherwise."""
        if self.process is None:
            raise RuntimeError(f"{self.what} was never started")
        wait_for_http(url, self.process, timeout_s, what=self.what, log_tail=self.log_tail, interval_s=interval_s)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM to the group, then SIGKILL when it has not exited within `timeout_s`; then SIGKILL to whatever
        is left of the group. Returns the exit status (negative: a signal). Safe to call twice."""
        process = self.process
        if process is None or self._stopped:
            return None if process is None else process.returncode
        self._stopped = True
        wait_s = self.stop_timeout_s if timeout_s is None else timeout_s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # children that outlived it
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
