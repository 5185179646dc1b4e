"""The life of `python -m server` with SERVER_MODE=http, as RunPod's load balancer sees it: GET /ping answers 204
while the model loads (work requests 503), then 200; with PORT_HEALTH set, /ping has a listener of its own; SIGTERM
stops new work (/ping 503, requests 503) while the request in flight finishes, and the process exits 0. Start-up
failures exit 2, as in queue mode. Local storage: the GCS path is exercised in test_openai_client.py."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

from testing.http_worker import API_KEY, START_TIMEOUT_S, http_env
from testing.loopback import ServerProcess, free_port
from testing.voices import ROOT, synthetic_voice

pytestmark = pytest.mark.slow

LONG_TEXT = ("Esta resposta é longa o bastante para ainda estar a caminho quando o sinal chegar. Ela continua com "
             "uma segunda frase, e termina com uma terceira.")  # fmt: skip


def get(url: str) -> int | None:
    """The status of GET url; None when nothing listens (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def post_speech(url: str, body: dict) -> tuple[int | None, bytes]:
    request = urllib.request.Request(f"{url}/v1/audio/speech", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {API_KEY}"}, method="POST")  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None, b""


def local_reference(folder: Path) -> None:
    path = folder / "objects" / "voices" / "referencias" / "voz_joao.wav"
    path.parent.mkdir(parents=True)
    sf.write(path, synthetic_voice(3.0), 22050)


def test_ping_goes_204_then_200_and_sigterm_drains_the_request_in_flight(tmp_path):
    local_reference(tmp_path)
    port, health_port = free_port(), free_port()
    env = http_env(tmp_path, port, free_port(), PORT_HEALTH=str(health_port), API_KEY=API_KEY,
                   STORAGE_BACKEND="local", LOCAL_STORAGE_DIR=str(tmp_path / "objects"), GCS_BUCKET_NAME="voices",
                   VOICE_REF_URL_TEMPLATE="gs://voices/referencias/{voice}.wav")  # fmt: skip
    server = ServerProcess([sys.executable, "-m", "server"], tmp_path / "worker.log", env=env, cwd=ROOT,
                           what="http-lifecycle").start()  # fmt: skip
    url, health = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health_port}"
    try:
        # 1. Starting: /ping 204 on both listeners, work refused with 503 (never a hang, never a 200).
        seen, early = [], None
        deadline = time.monotonic() + START_TIMEOUT_S
        while (status := get(f"{health}/ping")) != 200:
            assert server.process.poll() is None and time.monotonic() < deadline, server.log_tail()
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == 204 and early is None:
                early = post_speech(url, {"input": "Oi", "voice": "voz_joao"})
            time.sleep(0.1)
        seen.append(200)
        assert seen == [204, 200], seen
        assert early is not None and early[0] == 503 and b'"worker_starting"' in early[1]
        assert get(f"{url}/ping") == 200 and get(f"{health}/v1/audio/speech") in (404, 405)

        # 2. A long streamed request, then SIGTERM once its first audio arrived.
        result: dict = {}
        first_audio = threading.Event()

        def stream() -> None:
            body = {"input": LONG_TEXT, "voice": "voz_joao", "response_format": "wav", "seed": 3}
            request = urllib.request.Request(f"{url}/v1/audio/speech", method="POST", data=json.dumps(body).encode(),
                                             headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=300) as response:
                body = response.read(64)
                first_audio.set()
                result["body"] = body + response.read()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_audio.wait(120), server.log_tail()
        os.killpg(server.pid, signal.SIGTERM)
        # The signal reaches the event loop a moment later: /ping turns unhealthy, and stays so.
        draining = [get(f"{health}/ping")]
        while draining[-1] == 200 and len(draining) < 100:
            time.sleep(0.1)
            draining.append(get(f"{health}/ping"))
        draining += [get(f"{health}/ping") for _ in range(3)]
        late = post_speech(url, {"input": "Oi", "voice": "voz_joao"})
        reader.join(300)
        status = server.process.wait(120)
    finally:
        server.stop(10)
    log = server.log_path.read_text()
    while draining[0] == 200:
        draining.pop(0)
    assert draining and all(s in (503, None) for s in draining), draining  # unhealthy, or already closed
    assert late[0] in (503, None) and (late[0] is None or b'"worker_shutting_down"' in late[1]), late
    audio, sr = sf.read(io.BytesIO(result["body"]), dtype="float32")  # the request in flight finished whole
    assert sr == 24000 and len(audio) / sr > 2.0
    assert status == 0, log[-3000:]
    assert "draining 1 request(s) in flight" in log and "drained: exiting" in log


def test_a_port_that_cannot_be_bound_exits_2_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = http_env(tmp_path, port, free_port(), STORAGE_BACKEND="local", LOCAL_STORAGE_DIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "server"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stdout and "engine ready" not in done.stdout


def test_a_bad_http_variable_exits_2_naming_it(tmp_path):
    env = http_env(tmp_path, free_port(), free_port(), VOICE_REF_URL_TEMPLATE="gs://b/{id}.wav")
    done = subprocess.run([sys.executable, "-m", "server"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "VOICE_REF_URL_TEMPLATE must be a URL with one {voice}" in done.stderr
