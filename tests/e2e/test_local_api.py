"""`python -m server --rp_serve_api`: RunPod's local test API, on the README's local defaults (what
scripts/run-worker.sh sets: STORAGE_BACKEND=local, LOCAL_STORAGE_DIR, GCS_BUCKET_NAME=seu-bucket, AUDIO_CACHE_DIR,
LATENT_CACHE_DIR, the seed example's reference at LOCAL_STORAGE_DIR/seu-bucket/referencias/voz_joao.wav, a
synthetic voice of 6 s). Differences from the script, on purpose: the tiny demo checkpoint instead of the small one
(faster here; the same code path), a free port for the metrics endpoint instead of 9090 (other processes on this
machine may hold it), and every folder under the test's temporary directory.

POST /runsync with test_input.json answers COMPLETED with a file:// audio_url whose file decodes.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from testing.e2e_worker import REPO, SEED_INPUT, SEED_KEYS, SEED_PARAMETER_KEYS, server_process, worker_env
from testing.loopback import free_port
from testing.voices import synthetic_voice

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300.0  # hang guards only
REQUEST_TIMEOUT_S = 300.0


def post(url: str, payload: object) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def local_api(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The local test API on 127.0.0.1:<free port>, ready; yields (base URL, LOCAL_STORAGE_DIR, metrics URL)."""
    folder = tmp_path_factory.mktemp("e2e-local-api")
    storage_dir = folder / "local_storage"
    reference = storage_dir / "seu-bucket" / "referencias" / "voz_joao.wav"
    reference.parent.mkdir(parents=True)
    sf.write(reference, synthetic_voice(6.0), 22050)
    assert SEED_INPUT["ref_audio_url"] == "gs://seu-bucket/referencias/voz_joao.wav"

    env = worker_env(
        XTTS_MODEL_DIR=str(tiny_checkpoint),
        STORAGE_BACKEND="local",
        LOCAL_STORAGE_DIR=str(storage_dir),
        GCS_BUCKET_NAME="seu-bucket",
        AUDIO_CACHE_DIR=str(folder / "audio_cache"),
        LATENT_CACHE_DIR=str(folder / "latent_cache"),
        METRICS_PORT=str(metrics_port := free_port()),
    )
    port = free_port()
    args = ["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    log_path = folder / "local-api.log"
    base = f"http://127.0.0.1:{port}"
    with server_process("local-api", args, env, log_path) as server:
        server.wait_ready(f"{base}/openapi.json", START_TIMEOUT_S)
        yield base, storage_dir, f"http://127.0.0.1:{metrics_port}/metrics"


def test_runsync_with_the_seed_payload_answers_with_a_local_file_that_decodes(local_api):
    base, storage_dir, metrics_url = local_api
    payload = json.loads((REPO / "test_input.json").read_text(encoding="utf-8"))
    answer = post(f"{base}/runsync", payload)

    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    for key in SEED_KEYS:
        assert key in out, f"output lacks {key!r}: {sorted(out)}"
    assert (out["voice_id"], out["language"]) == (SEED_INPUT["voice_id"], SEED_INPUT["language"])
    assert out["parameters"] == {key: SEED_INPUT[key] for key in SEED_PARAMETER_KEYS}

    url = urlsplit(out["audio_url"])
    assert url.scheme == "file", out["audio_url"]
    path = Path(unquote(url.path))
    assert path.parent == storage_dir / "seu-bucket" / "generated" and path.name.startswith("joao_formal_")
    audio, rate = sf.read(path, dtype="float32")
    assert audio.ndim == 1 and len(audio) > 0
    assert abs(len(audio) / rate - out["duration"]) <= 0.01, (len(audio) / rate, out["duration"])

    # The same payload again: the reference comes from the disk cache and the speaker latents from memory.
    again = post(f"{base}/runsync", payload)
    assert again["status"] == "COMPLETED", again
    assert again["output"]["reference_cache_hit"] is True and again["output"]["latent_cache_hit"] is True
    assert again["output"]["audio_url"] != out["audio_url"]
    assert Path(unquote(urlsplit(again["output"]["audio_url"]).path)).is_file()
    # The README's second command: the metrics endpoint counts both jobs.
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        families = text_string_to_metric_families(response.read().decode())
        completed = sum(sample.value for family in families for sample in family.samples
                        if sample.name == "xtts_jobs_total" and sample.labels.get("status") == "completed")  # fmt: skip
    assert completed == 2
    print(f"\n/runsync: {out['duration']} s of audio at {path.name}, generation_time {out['generation_time']} s")


def test_runsync_answers_a_bad_payload_with_failed_and_the_reason(local_api):
    base, _, _ = local_api
    answer = post(f"{base}/runsync", {"input": {**SEED_INPUT, "language": "pt-BR"}})
    assert answer["status"] == "FAILED", answer
    assert "language 'pt-BR' is not supported" in answer["error"], answer
    assert "output" not in answer
