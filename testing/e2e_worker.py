"""The real `python -m server` in RunPod's production mode, for the tests in the loop (tests/e2e, tests/http): its
environment (`worker_env`), a running worker and its metrics (`running_worker`, `E2EWorker`, `MetricsSnapshot`),
a server process for tests without an event loop (`server_process`), the seed's voices and contract keys.

Worker logs open now are in `OPEN_LOGS`: tests/conftest.py adds their tails to a failing test's report.
Timeouts here are hang guards only (a worker takes ~15-25 s to start on a 2-core machine): no assertion is about
speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.stats import Snapshot
from testing.faulty_worker import GATE
from testing.loopback import ServerProcess
from testing.runpod_fake import FakeRunPod, WorkerProcess
from testing.voices import ROOT, synthetic_voice_wav

REPO = ROOT
FAULTY_WORKER = ROOT / "testing" / "faulty_worker.py"
BUCKET = "seu-bucket"  # GCS_BUCKET_NAME: results go here; the seed's test_input.json reference lives here
OTHER_BUCKET = "meu-bucket"  # the seed README's curl and Python examples read their references from this one
SEED_INPUT: dict = json.loads((REPO / "test_input.json").read_text(encoding="utf-8"))["input"]
SEED_KEYS = ("audio_url", "duration", "voice_id", "language", "generation_time", "parameters")
SEED_PARAMETER_KEYS = ("temperature", "speed", "top_k", "top_p")

# Hang guards, never speed assertions.
START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 480.0

MISSING_OBJECT = "referencias/nao_existe.wav"  # never uploaded
NOT_AUDIO_OBJECT = "referencias/texto.wav"  # a text file with a .wav name and an audio content type


@dataclass(frozen=True)
class Voice:
    voice_id: str
    bucket: str
    object_name: str
    f0: float
    seed: int

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}/{self.object_name}"

    def wav_bytes(self, seconds: float = 4.0) -> bytes:
        return synthetic_voice_wav(seconds, sr=22050, f0=self.f0, seed=self.seed)


# The first three are the seed README's own examples (test_input.json, the curl example, the Python example).
VOICES: tuple[Voice, ...] = (
    Voice("joao_formal", BUCKET, "referencias/voz_joao.wav", 120.0, 0),
    Voice("maria_news", OTHER_BUCKET, "vozes/maria.wav", 210.0, 1),
    Voice("carlos_podcast", OTHER_BUCKET, "vozes/carlos.wav", 95.0, 2),
    Voice("ana_calma", BUCKET, "vozes/ana.wav", 175.0, 3),
)
assert VOICES[0].url == SEED_INPUT["ref_audio_url"] and VOICES[0].voice_id == SEED_INPUT["voice_id"]

# Variables the worker (server.config, storage.config) or the RunPod SDK read: never inherited from the shell
# that runs pytest, so each test's worker sees exactly what the test sets.
_WORKER_VARIABLES = (
    "RUNPOD_", "GCS_", "STORAGE_", "GOOGLE_APPLICATION_CREDENTIALS", "XTTS_", "LATENT_CACHE", "AUDIO_CACHE",
    "LOCAL_STORAGE_DIR", "ALLOWED_", "ALLOW_LOOPBACK", "MAX_", "BATCH_WAIT_MS", "METRICS_PORT", "JOB_TIMEOUT",
    "DEFAULT_LANGUAGE", "DEFAULT_OUTPUT_FORMAT", "LOG_LEVEL", "SIGNED_URL_TTL_S", "SCHEDULING", "STREAM",
    "VOCODER_SPAN", "SERVER_MODE", "PORT_HEALTH", "API_KEY", "VOICE_REF_URL_TEMPLATE", "HTTP_", "METRICS_HOST",
)  # fmt: skip


def worker_env(**settings: str) -> dict[str, str]:
    """The environment of a worker process: this one without any worker variable, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_WORKER_VARIABLES)}
    env.update(PYTHONUNBUFFERED="1", LOG_LEVEL="INFO")
    env.update(settings)
    return env


def tail(path: Path, chars: int = 6000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text if len(text) <= chars else "...\n" + text[-chars:]


# Logs of the worker processes running now, by name: their tails go into the report of a failing test.
OPEN_LOGS: dict[str, Path] = {}


# ------------------------------------------------------------------------------------------------ metrics


class MetricsSnapshot(Snapshot):
    """One scrape of the worker's Prometheus endpoint (bench.stats.Snapshot), with the sums and shortcuts the
    e2e tests read."""

    def total(self, name: str, **labels: str) -> float:
        """Sum over every label set that includes `labels` (e.g. all languages of one status)."""
        wanted = set(labels.items())
        return sum(v for ls, v in self.series(name).items() if wanted <= set(ls))

    def buckets(self, name: str) -> dict[float, float]:
        """A histogram's cumulative bucket counts, `le` -> count."""
        return dict(sorted((float(dict(ls)["le"]), v) for ls, v in self.series(f"{name}_bucket").items()))

    # The numbers the tests look at.
    @property
    def batches(self) -> float:
        return self.get("xtts_batch_size_rows_count")

    @property
    def batch_rows(self) -> float:
        return self.get("xtts_batch_size_rows_sum")

    @property
    def rows_admitted(self) -> float:
        """Rows that reached the engine (each segment once, unless a failed batch retried it)."""
        return self.get("xtts_admitted_rows_total")

    @property
    def batches_of_one(self) -> float:
        return self.buckets("xtts_batch_size_rows").get(1.0, 0.0)

    @property
    def latent_hits(self) -> float:
        return self.get("xtts_cache_hits_total", cache="latents")

    @property
    def latent_misses(self) -> float:
        return self.get("xtts_cache_misses_total", cache="latents")

    @property
    def in_flight(self) -> float:
        return self.get("xtts_jobs_in_flight")

    @property
    def queue_depth(self) -> float:
        return self.get("xtts_queue_depth_requests")

    def jobs(self, status: str) -> float:
        return self.total("xtts_jobs_total", status=status)

    def minus(self, before: MetricsSnapshot) -> MetricsSnapshot:
        """Counters and histograms since `before` (gauges come out as differences too: read them from self)."""
        keys = set(self.samples) | set(before.samples)
        return MetricsSnapshot({k: self.samples.get(k, 0.0) - before.samples.get(k, 0.0) for k in keys})

    def batch_size_counts(self) -> dict[str, int]:
        """Batches per histogram bucket (`"<=1"`, `"2"`, `"3-4"`...), from the cumulative counts."""
        out, previous_le, previous = {}, 0.0, 0.0
        for le, count in self.buckets("xtts_batch_size_rows").items():
            if count - previous > 0:
                low = int(previous_le) + 1
                label = "+Inf" if math.isinf(le) else (str(int(le)) if low >= int(le) else f"{low}-{int(le)}")
                out[label] = int(count - previous)
            if not math.isinf(le):
                previous_le = le
            previous = count
        return out


# ------------------------------------------------------------------------------------------------ the worker


class E2EWorker:
    """A running `python -m server` process (a testing.runpod_fake.WorkerProcess) and its metrics endpoint."""

    def __init__(self, name: str, process: WorkerProcess, metrics_port: int, gate_file: Path | None = None):
        self.name = name
        self.process = process
        self.metrics_port = metrics_port
        self.gate_file = gate_file  # FAULTY_GATE_FILE of a worker run through testing/faulty_worker.py
        self.exit_status: int | None = None

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log_text(self) -> str:
        return self.process.log_text()

    def tail(self, chars: int = 6000) -> str:
        return tail(self.log_path, chars)

    @property
    def alive(self) -> bool:
        return self.process.process is not None and self.process.process.returncode is None

    async def metrics(self) -> MetricsSnapshot:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(url) as response:
                assert response.status == 200, f"metrics endpoint answered {response.status}"
                return MetricsSnapshot.parse(await response.text())


@contextlib.asynccontextmanager
async def running_worker(
    name: str, fake: FakeRunPod, env: Mapping[str, str], log_dir: Path, *, metrics_port: int,
    gated: bool = False,
) -> AsyncIterator[E2EWorker]:  # fmt: skip
    """Start `python -m server` against `fake`, wait until the SDK asks for jobs and the metrics endpoint answers,
    yield it; SIGTERM (then SIGKILL) its process group at the end, whatever happened. `gated`: run the server's
    main through testing/faulty_worker.py with a gate file (E2EWorker.gate_file) for its GATE seed."""
    log_path = log_dir / f"{name}.log"
    argv, env, gate_file = [sys.executable, "-m", "server"], dict(env), None
    if gated:
        gate_file = log_dir / f"{name}.gate"
        argv = [sys.executable, str(FAULTY_WORKER)]
        env.update(FAULTY_GATE_FILE=str(gate_file), FAULTY_GATE_SEEDS=str(GATE))
    process = WorkerProcess(argv, {**env, **fake.env()}, log_path, cwd=str(REPO))
    await process.start()
    worker = E2EWorker(name, process, metrics_port, gate_file)
    OPEN_LOGS[name] = log_path
    try:
        await _wait_ready(worker, fake)
        yield worker
    finally:
        if gate_file is not None:
            gate_file.unlink(missing_ok=True)  # never leave a batch held: the worker must be able to stop
        worker.exit_status = await process.stop(timeout_s=30)
        OPEN_LOGS.pop(name, None)
    # RunPod stops a worker with SIGTERM: it must exit by itself, cleanly (-9 would mean it needed SIGKILL).
    assert worker.exit_status == 0, f"worker {name} exited with {worker.exit_status} on SIGTERM:\n{worker.tail()}"


async def _wait_ready(worker: E2EWorker, fake: FakeRunPod) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while True:
        if not worker.alive:
            raise AssertionError(
                f"worker {worker.name} exited with {worker.process.process.returncode} while starting; log:\n"
                f"{worker.tail()}"
            )
        if fake.take_requests:  # the SDK's job loop is running: the engine was loaded and warmed before it
            try:
                await worker.metrics()
                return
            except (aiohttp.ClientError, OSError):
                pass
        if loop.time() > deadline:
            raise AssertionError(f"worker {worker.name} not ready within {START_TIMEOUT_S:g} s; log:\n{worker.tail()}")
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def server_process(name: str, args: list[str], env: Mapping[str, str], log_path: Path,
                   cwd: Path = REPO) -> Iterator[ServerProcess]:  # fmt: skip
    """`python -m server ARGS` in a process group of its own (for tests without an event loop), its output in
    `log_path`; at the end the whole group is sent SIGTERM, then SIGKILL, whatever happened."""
    server = ServerProcess([sys.executable, "-m", "server", *args], log_path, env=env, cwd=cwd, what=name)
    with server:
        OPEN_LOGS[name] = log_path
        try:
            yield server
        finally:
            OPEN_LOGS.pop(name, None)
