"""server.handler with STREAMING=on: the handler is an async generator; a job yields its audio items (16-bit PCM,
base64) in order, then a result item with the seed's keys; joined, the items are the stored file's audio. On the
real scheduler with the tiny demo engine and real local storage (testing/handler_world.py's `world`)."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf

from batching import LatentCache, Scheduler
from batching.errors import BatchError
from server.handler import MAX_ITEM_S, audio_items, make_handler
from server.metrics import SchedulerMetrics
from batching.streaming import AudioChunk
from testing.handler_world import EXTRA_KEYS, SEED_KEYS, ScriptedScheduler, sample, seed_input

TEXT = "Olá! Este é um teste de streaming, com duas frases. A segunda frase é um pouco mais longa que a primeira."


def stored_audio(audio_url: str) -> np.ndarray:
    audio, _ = sf.read(io.BytesIO(Path(urlsplit(audio_url).path).read_bytes()), dtype="float32")
    return audio


def pcm(items: list[dict]) -> np.ndarray:
    return np.concatenate([np.frombuffer(base64.b64decode(i["audio"]), dtype="<i2") for i in items]) / 32767.0


async def collect(handler, job) -> list[dict]:
    return [item async for item in handler(job)]


@pytest.fixture
async def streaming(world, tiny_engine):
    scheduler = Scheduler(tiny_engine, LatentCache(8, None, "tiny"), max_batch_size=4, batch_wait_s=0.0,
                          observer=SchedulerMetrics(world["metrics"]))  # fmt: skip
    await scheduler.start()
    handler = make_handler(world["handler_for"].context_for(scheduler, streaming=True), streaming=True)
    yield handler, scheduler
    await scheduler.close()


def test_the_streaming_handler_is_an_async_generator_for_the_sdk(world):
    from runpod.serverless.modules.rp_handler import is_generator

    handler = make_handler(world["handler_for"].context_for(ScriptedScheduler()), streaming=True)
    assert is_generator(handler)


async def test_a_job_streams_its_audio_then_its_result(world, streaming, caplog):
    caplog.set_level(logging.INFO, logger="server.handler")
    handler, scheduler = streaming
    items = await collect(handler, {"id": "job-s", "input": seed_input(gen_text=TEXT, seed=4)})
    audio, result = items[:-1], items[-1]
    assert audio and all(i["type"] == "audio" for i in audio) and result["type"] == "result"
    assert [i["index"] for i in audio] == list(range(len(audio)))
    assert all(i["encoding"] == "pcm_s16le" and i["sample_rate"] == 24000 for i in audio)
    starts = np.cumsum([0.0] + [i["duration"] for i in audio[:-1]])
    np.testing.assert_allclose([i["start"] for i in audio], starts, atol=1e-5)
    assert set(result) == SEED_KEYS | EXTRA_KEYS | {"type", "time_to_first_audio", "audio_items"}
    assert result["audio_items"] == len(audio) and 0 < result["time_to_first_audio"] <= result["total_time"]

    streamed = pcm(audio)
    stored = stored_audio(result["audio_url"])
    assert len(streamed) == len(stored)
    np.testing.assert_allclose(streamed, stored, rtol=0, atol=1e-3)
    assert abs(len(streamed) / 24000 - result["duration"]) < 0.01

    assert sample(world, "xtts_time_to_first_audio_seconds_count") == 1
    assert sample(world, "xtts_jobs_total", status="completed", language="pt") == 1
    assert sample(world, "xtts_vocoder_frames_total", kind="given") > 0
    assert sample(world, "xtts_vocoder_frames_total", kind="vocoded") >= sample(
        world, "xtts_vocoder_frames_total", kind="given")  # fmt: skip
    assert sample(world, "xtts_jobs_in_flight") == 0 and scheduler.idle


async def test_a_job_that_asks_for_no_stream_yields_only_its_result(world, streaming):
    handler, _ = streaming
    items = await collect(handler, {"id": "job-n", "input": seed_input(gen_text="Olá!", stream=False)})
    assert len(items) == 1 and items[0]["type"] == "result" and set(items[0]) == SEED_KEYS | EXTRA_KEYS | {"type"}


async def test_bad_input_is_one_error_item_naming_the_field(world, streaming):
    handler, _ = streaming
    (item,) = await collect(handler, {"id": "job-b", "input": seed_input(stream="yes")})
    assert item["error"].startswith("[invalid_type] stream must be true or false") and item["error_code"] == "invalid_type"


async def test_a_failing_job_yields_its_error_with_its_code_and_uploads_nothing(world):
    handler = make_handler(world["handler_for"].context_for(FailingStream(), streaming=True), streaming=True)
    items = await collect(handler, {"id": "job-f", "input": seed_input(gen_text=TEXT)})
    assert [i["type"] for i in items[:-1]] == ["audio"]
    assert items[-1]["error"] == "[generation_failed, retryable] broke mid-stream"
    objects = world["reference"].parents[2]  # LOCAL_STORAGE_DIR: <bucket>/referencias/voz_joao.wav
    assert not [p for p in objects.rglob("*") if "generated" in p.parts]
    assert sample(world, "xtts_jobs_total", status="failed", language="pt") == 1


class FailingStream(ScriptedScheduler):
    """Gives one chunk, then fails the request."""

    def stream(self, request):
        async def items():
            await request.load_reference()
            yield AudioChunk(0, np.zeros(2400, dtype=np.float32), 0, 24000)
            raise BatchError("broke mid-stream")

        return items()


def test_long_chunks_are_split_under_runpods_message_limit():
    chunk = AudioChunk(3, np.linspace(-1, 1, int(24000 * (2.5 * MAX_ITEM_S)), dtype=np.float32), 48000, 24000)
    items = audio_items(chunk, 7)
    assert [i["index"] for i in items] == [7, 8, 9]
    assert [i["start"] for i in items] == [2.0, 2.0 + MAX_ITEM_S, 2.0 + 2 * MAX_ITEM_S]
    assert all(len(i["audio"]) < 1_000_000 * 0.7 for i in items)
    np.testing.assert_allclose(pcm(items), chunk.samples, atol=1 / 32767)
