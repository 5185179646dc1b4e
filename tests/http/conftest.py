"""Fixtures for SERVER_MODE=http: the real `python -m server` in a process of its own, on loopback, with the tiny demo
checkpoint on CPU and the GCS emulator (testing.gcs_emulator) as its storage.

    http_bucket     fake-gcs-server with the bucket `seu-bucket` and two reference voices under referencias/
    http_worker     `python -m server` with SERVER_MODE=http against it: API_KEY set, VOICE_REF_URL_TEMPLATE
                    gs://seu-bucket/referencias/{voice}.wav, MAX_CONCURRENCY 24, MAX_BATCH_SIZE 8; ready when
                    GET /ping answers 200; SIGTERM at the end (its whole process group), which must exit 0

A worker's log goes to a file; the tail of every worker log still open is added to a failing test's report.
Timeouts are hang guards only (a worker takes ~15-25 s to start on a 2-core machine): no assertion is about speed.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from testing.gcs_emulator import GcsEmulator
from testing.loopback import ServerProcess, free_port
from testing.voices import demo_checkpoint, synthetic_voice_wav
from testing.voices import ROOT
# _OPEN_LOGS and its hook: the tails of the worker logs open when a test fails go into its report, as in tests/e2e.
from tests.e2e.conftest import _OPEN_LOGS, MetricsSnapshot, pytest_runtest_makereport, tail, worker_env  # noqa: F401
from testing.accounts import ServiceAccount

BUCKET = "seu-bucket"
TEMPLATE = f"gs://{BUCKET}/referencias/{{voice}}.wav"
VOICES = {"voz_joao": 120.0, "voz_ana": 175.0}  # voice id -> the synthetic voice's pitch
API_KEY = "sk-http-test-4f1c2b"
START_TIMEOUT_S = 300.0


@dataclass
class HttpWorker:
    """A running `python -m server` in HTTP mode."""

    name: str
    server: ServerProcess
    port: int
    metrics_port: int
    exit_status: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = API_KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def metrics(self) -> MetricsSnapshot:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return MetricsSnapshot.parse(response.read().decode())

    def post_json(self, path: str, body: object, api_key: str = API_KEY) -> tuple[int, dict]:
        """POST a JSON body (POST /tts); (status, the JSON answer)."""
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {api_key}",
                                                  "Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def log_text(self) -> str:
        return self.server.log_path.read_text(errors="replace")


def http_env(folder: Path, port: int, metrics_port: int, **settings: str) -> dict[str, str]:
    """A worker's environment in HTTP mode (nothing inherited that the worker reads), plus `settings`."""
    env = {k: v for k, v in worker_env().items()
           if k not in ("SERVER_MODE", "HOST", "PORT", "PORT_HEALTH", "API_KEY", "VOICE_REF_URL_TEMPLATE")}  # fmt: skip
    env.update(
        SERVER_MODE="http", HOST="127.0.0.1", PORT=str(port), METRICS_PORT=str(metrics_port),
        XTTS_MODEL_DIR=str(demo_checkpoint("tiny")), XTTS_DEVICE="cpu",
        LATENT_CACHE_DIR=str(folder / "latent_cache"), AUDIO_CACHE_DIR=str(folder / "audio_cache"),
    )  # fmt: skip
    env.update(settings)
    return env


def start_http_worker(name: str, env: Mapping[str, str], log_path: Path) -> HttpWorker:
    """Start the worker and wait until GET /ping answers 200 (the model loaded and warm)."""
    server = ServerProcess([sys.executable, "-m", "server"], log_path, env=env, cwd=ROOT, what=name).start()
    _OPEN_LOGS[name] = log_path
    worker = HttpWorker(name, server, int(env["PORT"]), int(env["METRICS_PORT"]))
    try:
        server.wait_ready(f"{worker.url}/ping", START_TIMEOUT_S, interval_s=0.2)
    except BaseException:
        stop_http_worker(worker)
        raise
    return worker


def stop_http_worker(worker: HttpWorker, timeout_s: float = 60.0) -> int | None:
    """SIGTERM (then SIGKILL) the worker's process group; its exit status."""
    worker.exit_status = worker.server.stop(timeout_s)
    _OPEN_LOGS.pop(worker.name, None)
    return worker.exit_status


@pytest.fixture(scope="module")
def http_bucket() -> Iterator[GcsEmulator]:
    with GcsEmulator(buckets=[BUCKET]) as emulator:
        for seed, (voice, f0) in enumerate(VOICES.items()):
            wav = synthetic_voice_wav(4.0, sr=22050, f0=f0, seed=seed)
            emulator.put_object(BUCKET, f"referencias/{voice}.wav", wav, "audio/wav")
        yield emulator


@pytest.fixture(scope="module")
def http_worker(
    http_bucket: GcsEmulator, service_account: ServiceAccount, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
) -> Iterator[HttpWorker]:  # fmt: skip
    folder = tmp_path_factory.mktemp("http-worker")
    env = http_env(
        folder, free_port(), free_port(), API_KEY=API_KEY, VOICE_REF_URL_TEMPLATE=TEMPLATE, MAX_CONCURRENCY="24",
        MAX_BATCH_SIZE="8", BATCH_WAIT_MS="50", STORAGE_BACKEND="gcs", STORAGE_EMULATOR_HOST=http_bucket.url,
        GCS_BUCKET_NAME=BUCKET, GCS_CREDENTIALS=service_account.json, ALLOWED_BUCKETS=BUCKET,
    )  # fmt: skip
    worker = start_http_worker("http-worker", env, folder / "worker.log")
    yield worker
    status = stop_http_worker(worker)
    assert status == 0, f"the HTTP worker exited with {status} on SIGTERM:\n{tail(worker.server.log_path)}"
