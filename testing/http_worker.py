"""The real `python -m server` in SERVER_MODE=http on loopback, for the tests through HTTP (tests/http): its
environment (`http_env`), start and stop (`start_http_worker`, `stop_http_worker`) and a handle with the
`openai` client, the metrics and a JSON POST (`HttpWorker`). Timeouts are hang guards only."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai

from testing.e2e_worker import OPEN_LOGS, MetricsSnapshot, worker_env
from testing.loopback import ServerProcess
from testing.voices import ROOT, demo_checkpoint

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


def start_http_worker(name: str, env: Mapping[str, str], log_path: Path, wrapper: Sequence[str] = ()) -> HttpWorker:
    """Start the worker (`python -m server`, run by `wrapper` if given, e.g. a shell that sets a ulimit first and
    then execs its arguments) and wait until GET /ping answers 200 (the model loaded and warm)."""
    argv = [*wrapper, sys.executable, "-m", "server"]
    server = ServerProcess(argv, log_path, env=env, cwd=ROOT, what=name).start()
    OPEN_LOGS[name] = log_path
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
    OPEN_LOGS.pop(worker.name, None)
    return worker.exit_status
