"""The real `python -m server` in RunPod's production loop against testing.runpod_fake, for tests/reliability:
its environment on local storage (`worker_env`), a reference voice on that storage (`put_reference`), a seed-style
job (`job`), and a worker started and waited on until it polls for jobs (`start_worker`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import soundfile as sf

from testing.runpod_fake import FakeRunPod, WorkerProcess
from testing.voices import demo_checkpoint, synthetic_voice

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # imports + model load + warm-up on a slow shared 2-core machine
RUN_TIMEOUT_S = 300

def worker_env(fake: FakeRunPod, tmp: Path, **settings: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "GCS_", "STORAGE_", "XTTS_"))}
    return {
        **base,
        **fake.env(),
        "RUNPOD_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        "XTTS_MODEL_DIR": str(demo_checkpoint("tiny")),
        "XTTS_DEVICE": "cpu",
        "STORAGE_BACKEND": "local",
        "LOCAL_STORAGE_DIR": str(tmp / "objects"),
        "GCS_BUCKET_NAME": "voices",
        "AUDIO_CACHE_DIR": str(tmp / "audio_cache"),
        "LATENT_CACHE_DIR": str(tmp / "latents"),
        "METRICS_PORT": "0",
        **settings,
    }


def put_reference(tmp: Path, name: str, f0: float = 140.0) -> str:
    path = tmp / "objects" / "voices" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, synthetic_voice(3.0, f0=f0), 22050)
    return f"gs://voices/{name}"


def job(ref: str, voice: str, text: str = "Uma frase curta.") -> dict:
    return {"gen_text": text, "ref_audio_url": ref, "voice_id": voice, "language": "pt", "seed": 1}


async def start_worker(
    fake: FakeRunPod, env: dict[str, str], log: Path, argv: list[str] | None = None
) -> WorkerProcess:
    """Start `python -m server` (or `argv`) and wait until it polls for jobs."""
    worker = await WorkerProcess(argv or [sys.executable, "-m", "server"], env, log, cwd=str(REPO)).start()
    ready = await fake.wait_until(lambda: len(fake.take_requests) > 0 or worker.process.returncode is not None,
                                  START_TIMEOUT_S)  # fmt: skip
    if not ready or worker.process.returncode is not None:
        await worker.stop(5)
        pytest.fail(f"worker did not start polling for jobs:\n{worker.log_text()[-4000:]}")
    return worker
