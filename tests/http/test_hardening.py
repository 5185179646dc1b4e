"""SERVER_MODE=http against hostile and broken clients, through the real `python -m server` (tiny demo checkpoint,
local storage, loopback): each test reproduces a finding of issue #27 that failed on the old code.

The worker runs under `ulimit -n 1024` (the default open-files limit of many hosts) with a /ping listener of its
own (PORT_HEALTH), HTTP_KEEPALIVE_S=6, MAX_CONCURRENCY=2, HTTP_REF_AUDIO_URL=off and METRICS_HOST=127.0.0.2.
Stalled readers need small socket buffers: tests/http/test_stalled_readers.py runs them in a network namespace.
Timeouts are hang guards; no assertion is about speed.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import soundfile as sf

from testing.e2e_worker import MetricsSnapshot, tail
from testing.http_worker import HttpWorker, http_env, start_http_worker, stop_http_worker
from testing.loopback import free_port
from testing.voices import synthetic_voice

pytestmark = pytest.mark.slow

KEY = "sk-hardening-7d2e"
BUCKET = "voices"
TEMPLATE = f"gs://{BUCKET}/referencias/{{voice}}.wav"
KEEPALIVE_S = 6.0
FD_LIMIT = 1024
METRICS_HOST = "127.0.0.2"  # loopback too (127.0.0.0/8), but not the address the API listens on


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpWorker]:
    folder = tmp_path_factory.mktemp("hardening")
    reference = folder / "objects" / BUCKET / "referencias" / "voz_joao.wav"
    reference.parent.mkdir(parents=True)
    sf.write(reference, synthetic_voice(3.0), 22050)
    sf.write(reference.parent / "outra.wav", synthetic_voice(3.0, f0=180.0), 22050)
    health = free_port()
    env = http_env(
        folder, free_port(), free_port(), PORT_HEALTH=str(health), API_KEY=KEY, STORAGE_BACKEND="local",
        LOCAL_STORAGE_DIR=str(folder / "objects"), GCS_BUCKET_NAME=BUCKET, VOICE_REF_URL_TEMPLATE=TEMPLATE,
        MAX_CONCURRENCY="2", HTTP_KEEPALIVE_S=str(KEEPALIVE_S), HTTP_REF_AUDIO_URL="off", METRICS_HOST=METRICS_HOST,
    )  # fmt: skip
    worker = _start_limited(env, folder)
    worker.health_port = health
    yield worker
    status = stop_http_worker(worker)
    assert status == 0, f"the worker exited with {status} on SIGTERM:\n{tail(worker.server.log_path)}"
    log = worker.log_text()
    assert "Traceback" not in log and "never retrieved" not in log and "Logging error" not in log, log[-4000:]


def _start_limited(env: dict[str, str], folder) -> HttpWorker:
    """start_http_worker, the worker under `ulimit -n FD_LIMIT` (soft and hard: it cannot raise it)."""
    wrapper = ["bash", "-c", f"ulimit -n {FD_LIMIT} && exec \"$@\"", "worker"]
    return start_http_worker("hardening-worker", env, folder / "worker.log", wrapper)


def request(worker: HttpWorker, path: str, body: bytes, headers: dict[str, str] | None = None,
            port: int | None = None) -> tuple[int, bytes, dict]:  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    url = f"http://127.0.0.1:{port or worker.port}{path}"
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """One request written as raw bytes (headers no client library would send); the answer's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return answer.split(b"\r\n", 1)[0]


def ping(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def speech(text: str = "Olá, tudo bem?", **fields) -> bytes:
    return json.dumps({"input": text, "voice": "voz_joao", "response_format": "wav", **fields}).encode()


def test_idle_connections_past_the_cap_are_refused_with_503_and_ping_answers_throughout(worker):
    """1,100 connections that send nothing, more than the worker's file descriptors allow (ulimit -n 1024): past
    HTTP_MAX_CONNECTIONS (lowered to fit that limit) a connection is answered 503 too_many_connections, not reset;
    /ping on PORT_HEALTH answers 200 all along; HTTP_KEEPALIVE_S later the idle ones are closed and PORT serves
    again. (The old code: no cap, no timeout; /ping and the API refused connections for as long as they were
    held, and nothing was logged.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    idle: list[socket.socket] = []
    pings = []
    try:
        for n in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", worker.port), timeout=30))
            if n % 100 == 0:
                pings.append(ping(worker.health_port))
        pings.append(ping(worker.health_port))
        time.sleep(1.5)  # the burst's refusals have closed; the idle connections are still held
        refused = raw_request(worker.port, b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        assert refused == b"HTTP/1.1 503 Service Unavailable", refused
        # Past the cap, a connection is told why: the first MAX_REFUSING of a burst at once, the rest of a flood
        # reset (each answer takes a file descriptor too).
        answered = [s for s in idle[832:] if _answer(s).startswith(b"HTTP/1.1 503")]  # the cap: 832 at 1,024
        assert len(answered) >= 50, len(answered)
        pings.append(ping(worker.health_port))
        assert pings == [200] * len(pings), pings
        # Idle past HTTP_KEEPALIVE_S: the worker closes them (they read EOF), and PORT serves again.
        time.sleep(KEEPALIVE_S + 2)
        assert all(_closed(s) for s in idle[:50])
        assert ping(worker.port) == 200
    finally:
        for s in idle:
            s.close()
    metrics = _metrics(worker)
    assert metrics.get("xtts_http_refusals_total", code="too_many_connections") >= 100
    assert "HTTP_MAX_CONNECTIONS=1024 lowered to 832" in worker.log_text()
    assert "connection(s) refused" in worker.log_text()


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(1)
    try:
        return sock.recv(64)
    except OSError:
        return b""


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False


def test_a_key_that_is_not_utf8_gets_401_without_a_traceback(worker):
    status = raw_request(worker.port, b"POST /tts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80key\r\n"
                         b"Content-Type: application/json\r\n", b"{}")  # fmt: skip
    assert status == b"HTTP/1.1 401 Unauthorized", status
    assert "Traceback" not in worker.log_text()


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/tts"])
@pytest.mark.parametrize(("body", "rule"), [
    (b"[" * 5000 + b"]" * 5000, b"deeper than 32 levels"),
    (b'{"a":' * 33 + b"1" + b"}" * 33, b"deeper than 32 levels"),
    (b'{"input": "Oi", "voice": "voz_joao", "seed": ' + b"9" * 5000 + b"}", b"number longer than 100"),
    (b'{"input": "Oi", "voice": "voz_joao", "speed": 1.' + b"0" * 5000 + b"}", b"number longer than 100"),
])  # fmt: skip
def test_deep_json_and_huge_numbers_get_400_invalid_json(worker, path, body, rule):
    status, answer, _ = request(worker, path, body)
    assert status == 400 and json.loads(answer)["error"]["code"] == "invalid_json" and rule in answer, answer


def test_the_log_shows_the_callers_control_characters_escaped_and_a_lone_surrogate_is_refused_by_name(worker):
    status, _, _ = request(worker, "/v1/audio/speech", speech("Olá \x1b[31mvermelho\x07 e\u202efim"))
    assert status == 200
    log = worker.log_text()
    assert "Olá \\x1b[31mvermelho\\x07 e\\u202efim" in log and "\x1b" not in log and "\x07" not in log
    status, answer, _ = request(worker, "/v1/audio/speech", b'{"input": "a\\ud800b", "voice": "voz_joao"}')
    error = json.loads(answer)["error"]
    assert status == 400 and error["param"] == "input" and "lone surrogate" in error["message"], answer
    assert "Logging error" not in worker.log_text()


def test_clients_that_leave_mid_stream_or_at_its_end_leave_no_traceback(worker):
    """Readers that reset the connection after the status, after some audio, and after all of it but the end: no
    traceback, no 'never retrieved', and the worker serves on."""
    before = _metrics(worker)
    body = speech("Uma frase. Outra frase que continua. E a terceira termina aqui.", response_format="pcm")
    for keep in (0, 30_000, None):
        with socket.create_connection(("127.0.0.1", worker.port), timeout=120) as sock:
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
            got = b""
            while (keep is None or len(got) < keep + 200) and not got.endswith(b"\r\n0\r\n"):
                data = sock.recv(65536)
                if not data:
                    break
                got += data
                if keep is None and got.endswith(b"\r\n"):
                    continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
    assert request(worker, "/v1/audio/speech", speech())[0] == 200
    time.sleep(1)
    after = _metrics(worker)
    jobs = after.total("xtts_jobs_total") - before.total("xtts_jobs_total")
    assert jobs == 4, jobs
    log = worker.log_text()
    assert "Traceback" not in log and "never retrieved" not in log and "ERROR" not in log, log[-3000:]


def test_metrics_listen_on_metrics_host_only(worker):
    with urllib.request.urlopen(f"http://{METRICS_HOST}:{worker.metrics_port}/metrics", timeout=10) as response:
        assert b"xtts_jobs_in_flight" in response.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", worker.metrics_port), timeout=5).close()


def test_with_the_override_off_only_the_voices_own_reference_is_used(worker):
    """HTTP_REF_AUDIO_URL=off: another object as ref_audio_url is refused (400 ref_audio_forbidden, param
    ref_audio_url) on both routes; no ref_audio_url, or the voice's own, is served."""
    other = f"gs://{BUCKET}/referencias/outra.wav"
    own = TEMPLATE.format(voice="voz_joao")
    for path, body in (("/v1/audio/speech", speech(ref_audio_url=other)),
                       ("/tts", json.dumps({"gen_text": "Oi", "voice_id": "voz_joao", "ref_audio_url": other}))):
        status, answer, _ = request(worker, path, body if isinstance(body, bytes) else body.encode())
        error = json.loads(answer)["error"]
        assert status == 400 and error["code"] == "ref_audio_forbidden" and error["param"] == "ref_audio_url", answer
    assert request(worker, "/v1/audio/speech", speech(ref_audio_url=own))[0] == 200
    status, answer, _ = request(worker, "/tts", json.dumps({"gen_text": "Oi", "voice_id": "voz_joao"}).encode())
    assert status == 200 and json.loads(answer)["audio_url"], answer


def _metrics(worker: HttpWorker):
    with urllib.request.urlopen(f"http://{METRICS_HOST}:{worker.metrics_port}/metrics", timeout=10) as response:
        return MetricsSnapshot.parse(response.read().decode())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
