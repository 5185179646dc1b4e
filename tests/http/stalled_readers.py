"""Two stalled streaming readers against `python -m server` (SERVER_MODE=http), then a third request: a script run
by tests/http/test_stalled_readers.py inside a network namespace of its own, where small TCP buffers
(net.ipv4.tcp_wmem/rmem = 4096 16384 65536) make a reader that stops reading stall the worker's writes within
seconds of audio, as a 4 MB send buffer does after ~100 s of PCM on a real host.

    python tests/http/stalled_readers.py REPORT.json     (the worker's settings in the environment it is given)

It writes a JSON report: the third request's statuses over time (while the stalled readers hold both
MAX_CONCURRENCY slots: 429), when it was first served, samples of the worker's RSS and of its metrics, and the
metrics at the end. The test asserts on it; this script asserts nothing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

KEY = "sk-stalled-1b9c"
LONG_TEXT = " ".join(
    f"Esta é a frase número {n}, longa o bastante para fazer alguns segundos de áudio de teste." for n in range(12)
)
GIVE_UP_S = 150.0


def main(report_path: str) -> None:
    port, metrics_port = 18100, 18101
    folder = Path(os.environ["STALLED_FOLDER"])
    env = {**os.environ, "SERVER_MODE": "http", "HOST": "127.0.0.1", "PORT": str(port),
           "METRICS_PORT": str(metrics_port), "METRICS_HOST": "127.0.0.1", "API_KEY": KEY}  # fmt: skip
    log = open(folder / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "server"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    report: dict = {"statuses": [], "samples": []}
    try:
        _wait_ready(port, worker)
        url = f"http://127.0.0.1:{port}"
        assert _post(url, "Oi.")[0] == 200  # warm: the voice's latents are cached
        stalled = [_stalled_reader(port) for _ in range(2)]
        report["stalled_started"] = time.monotonic()
        started = time.monotonic()
        while time.monotonic() - started < GIVE_UP_S:
            status, _ = _post(url, "Oi.")
            now = time.monotonic() - started
            report["statuses"].append([round(now, 2), status])
            report["samples"].append({"t": round(now, 2), "rss_bytes": _rss(worker.pid), **_metrics(metrics_port)})
            if status == 200:
                report["served_after_s"] = now
                break
            time.sleep(0.5)
        # One dropped reader frees the slot the third request takes; the other may be dropped a moment later.
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            report["final"] = _metrics(metrics_port)
            if report["final"].get('xtts_http_clients_dropped_total{reason="write_timeout"}') == 2:
                break
            time.sleep(0.5)
        for sock in stalled:
            sock.close()
    finally:
        worker.terminate()
        try:
            report["exit_status"] = worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            report["exit_status"] = "killed"
        Path(report_path).write_text(json.dumps(report, indent=1))


def _stalled_reader(port: int) -> socket.socket:
    """A streamed PCM request whose reader takes the status and a little audio, then stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"input": LONG_TEXT, "voice": "voz_joao", "response_format": "pcm"}).encode()
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    got = b""
    sock.settimeout(120)
    while b"\r\n\r\n" not in got or len(got) < 2048:
        got += sock.recv(1024)
    return sock


def _post(url: str, text: str) -> tuple[int | None, bytes]:
    body = json.dumps({"input": text, "voice": "voz_joao", "response_format": "wav"}).encode()
    request = urllib.request.Request(f"{url}/v1/audio/speech", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return None, b""


def _wait_ready(port: int, worker: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the worker did not become ready")


def _metrics(port: int) -> dict[str, float]:
    wanted = {"xtts_running_rows", "xtts_jobs_in_flight", "xtts_queue_depth_requests",
              'xtts_http_clients_dropped_total{reason="write_timeout"}'}  # fmt: skip
    values = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return values
    for line in text.splitlines():
        match = re.fullmatch(r"(\S+) (\S+)", line)
        if match and match.group(1) in wanted:
            values[match.group(1)] = float(match.group(2))
        elif line.startswith("xtts_jobs_total{"):
            status = re.search(r'status="(\w+)"', line).group(1)
            values[f"jobs_{status}"] = values.get(f"jobs_{status}", 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main(sys.argv[1])
