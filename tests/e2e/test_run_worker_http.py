"""The README's HTTP-mode quick start, as written: `SERVER_MODE=http bash scripts/run-worker.sh` on embedded
defaults (local storage with the seed example's voice, no cloud account, no key) answers /ping 200, then the
README's curl body (voice `voz_joao`, response_format pcm) with the audio streamed as 16-bit PCM at 24 kHz; SIGTERM
ends it with exit status 0. Differences from a bare run, on purpose: the tiny demo checkpoint (XTTS_MODEL_DIR),
free ports, and the storage and caches under the test's temporary folder (the script's defaults are folders in
the repository)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from testing.e2e_worker import REPO, tail, worker_env
from testing.loopback import ServerProcess, free_port

pytestmark = pytest.mark.slow

README_BODY = {"model": "xtts-v2", "input": "Olá! Este áudio começa a tocar antes de estar pronto.",
               "voice": "voz_joao", "response_format": "pcm", "language": "pt"}  # fmt: skip


def test_run_worker_sh_serves_the_readme_curl_in_http_mode(tiny_checkpoint: Path, tmp_path: Path):
    port = free_port()
    env = worker_env(
        SERVER_MODE="http", PORT=str(port), METRICS_PORT=str(free_port()), XTTS_MODEL_DIR=str(tiny_checkpoint),
        LOCAL_STORAGE_DIR=str(tmp_path / "local_storage"), AUDIO_CACHE_DIR=str(tmp_path / "audio_cache"),
        LATENT_CACHE_DIR=str(tmp_path / "latent_cache"),
    )  # fmt: skip
    env.pop("HOST", None)
    log = tmp_path / "run-worker.log"
    server = ServerProcess(["bash", "scripts/run-worker.sh"], log, env=env, cwd=REPO, what="run-worker.sh")
    with server:
        server.wait_ready(f"http://127.0.0.1:{port}/ping", 600)
        # The script put the seed example's voice into local storage.
        assert (tmp_path / "local_storage" / "seu-bucket" / "referencias" / "voz_joao.wav").is_file()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/speech", method="POST",
                                         data=json.dumps(README_BODY).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200, tail(log)
            assert response.headers["Content-Type"] == "audio/pcm"
            assert response.headers["X-Audio-Sample-Rate"] == "24000"
            body = response.read()
        assert len(body) % 2 == 0 and len(body) / 2 / 24000 > 1.0, len(body)
        status = server.stop(60)
    assert status == 0, tail(log)
    assert f"listening on http://127.0.0.1:{port}" in log.read_text(errors="replace")  # the script's HOST
