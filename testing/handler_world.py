"""The handler tests' shared world: real local storage holding the seed's reference voice, a reference cache and
metrics (`world`, a pytest fixture: import it into a conftest or a test module by name), a scheduler whose
behaviour a test scripts (`ScriptedScheduler`), the seed's job input (`seed_input`) and its output keys."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import soundfile as sf
from prometheus_client import CollectorRegistry

from batching import SpeechResult
from server.config import WorkerConfig
from server.handler import HandlerContext, make_handler
from server.metrics import Metrics
from storage import ReferenceCache, StorageConfig, open_storage
from testing.fake_engine import FakeEngine, spell
from testing.voices import synthetic_voice

REPO = Path(__file__).resolve().parents[1]
SEED_KEYS = {"audio_url", "duration", "voice_id", "language", "generation_time", "parameters"}
EXTRA_KEYS = {
    "output_format", "object_name", "reference_cache_hit", "latent_cache_hit", "queue_wait", "batch_size",
    "segments", "total_time",
}  # fmt: skip
REF_URL = "gs://local/referencias/voz_joao.wav"


def seed_input(**changes) -> dict:
    job_input = json.loads((REPO / "test_input.json").read_text(encoding="utf-8"))["input"]
    return {**job_input, "ref_audio_url": REF_URL, **changes}


class ScriptedScheduler:
    """Stands in for batching.Scheduler where a test needs to decide what `submit` does. Its audio spells the
    request's text (tests.batching.test_scheduler.spell), so an upload can be traced back to its job."""

    clock = staticmethod(time.monotonic)

    def __init__(self, behaviour="ok"):
        self.behaviour = behaviour
        self.requests = []
        self.cancelled = []
        self.waiting = asyncio.Event()  # set once a "hang" submit is parked, as a queued request would be

    async def submit(self, request):
        self.requests.append(request)
        wav, sr = await request.load_reference()  # the real decode of the cached reference
        if isinstance(self.behaviour, BaseException):
            raise self.behaviour
        if self.behaviour == "hang":
            self.waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.request_id)
                raise
        out = spell(request.text)
        return SpeechResult(
            wav=out, sample_rate=FakeEngine.sample_rate, duration_s=len(out) / FakeEngine.sample_rate, segments=1,
            queue_wait_s=0.01, engine_s=0.5, conditioning_s=0.2, latent_cache_hit=False, batch_sizes=(3,),
        )  # fmt: skip


@pytest.fixture
async def world(tmp_path):
    """Real local storage with the seed's reference voice in it, a reference cache and metrics."""
    storage_config = StorageConfig.from_env(
        {"LOCAL_STORAGE_DIR": str(tmp_path / "objects"), "AUDIO_CACHE_DIR": str(tmp_path / "cache")}
    )
    reference = tmp_path / "objects" / "local" / "referencias" / "voz_joao.wav"
    reference.parent.mkdir(parents=True)
    sf.write(reference, synthetic_voice(seconds=3.0), 22050)
    storage = await open_storage(storage_config)
    references = ReferenceCache(storage_config.cache_dir, storage_config.cache_max_bytes, storage)
    metrics = Metrics(CollectorRegistry())

    def context_for(scheduler, **config_changes):
        config = WorkerConfig(storage=storage_config, **config_changes)
        return HandlerContext(
            config=config, storage=storage, references=references, scheduler=scheduler, metrics=metrics,
            reference_sample_rate=22050, max_reference_s=30.0,
        )  # fmt: skip

    def handler_for(scheduler, **config_changes):
        return make_handler(context_for(scheduler, **config_changes))

    handler_for.context_for = context_for

    yield {"storage": storage, "references": references, "metrics": metrics, "handler_for": handler_for,
           "reference": reference}  # fmt: skip
    await references.close()
    await storage.close()


def sample(world, name, **labels):
    return world["metrics"].registry.get_sample_value(name, labels)
