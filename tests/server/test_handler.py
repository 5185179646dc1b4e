"""server.handler: one job from input to the seed's response, on real storage (local backend, real reference
cache, real encoding). The GPU side is the real Scheduler with the tiny demo engine in the end-to-end test, and a
hand-written scheduler where a test needs a failure, a hang or a cancellation on cue."""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import soundfile as sf

from batching import LatentCache, Scheduler
from batching.errors import BatchError
from server.handler import make_handler
from server.metrics import SchedulerMetrics
from testing.fake_engine import FakeEngine, spell, spoken
from testing.handler_world import EXTRA_KEYS, REF_URL, SEED_KEYS, ScriptedScheduler, sample, seed_input


def decoded_duration(audio_url: str) -> float:
    path = Path(urlsplit(audio_url).path)
    info = sf.info(io.BytesIO(path.read_bytes()))
    return info.frames / info.samplerate


def uploaded_text(audio_url: str) -> str:
    """What the uploaded result spells (the fake engines' audio: tests.batching.test_scheduler.spell)."""
    audio, _ = sf.read(io.BytesIO(Path(urlsplit(audio_url).path).read_bytes()), dtype="float32")
    return spoken(audio)


async def test_seed_example_end_to_end_on_the_demo_engine(world, tiny_engine, caplog):
    caplog.set_level(logging.INFO, logger="server.handler")
    metrics = world["metrics"]
    scheduler = Scheduler(
        tiny_engine, LatentCache(8, None, "tiny"), max_batch_size=4, batch_wait_s=0.05,
        observer=SchedulerMetrics(metrics),
    )  # fmt: skip
    await scheduler.start()
    handler = world["handler_for"](scheduler)
    try:
        # Two jobs of one new voice at once (one download, one conditioning), then one more of the same voice.
        first, second = await asyncio.gather(
            handler({"id": "job-a", "input": seed_input(gen_text="Olá!")}),
            handler({"id": "job-b", "input": seed_input(gen_text="Tudo bem?", output_format="flac")}),
        )
        third = await handler({"id": "job-c", "input": seed_input(gen_text="Até logo.")})
    finally:
        await scheduler.close()

    for output in (first, second, third):
        assert set(output) == SEED_KEYS | EXTRA_KEYS, output
        assert output["parameters"] == {"temperature": 0.7, "speed": 1.0, "top_k": 50, "top_p": 0.85}
        assert (output["voice_id"], output["language"]) == ("joao_formal", "pt")
        assert output["duration"] > 0 and output["generation_time"] >= 0
        assert abs(decoded_duration(output["audio_url"]) - output["duration"]) < 0.02
        assert output["object_name"].startswith("generated/joao_formal_")
    assert (first["output_format"], second["output_format"]) == ("wav", "flac")
    assert second["object_name"].endswith(".flac")
    assert third["reference_cache_hit"] and third["latent_cache_hit"]
    assert [first["latent_cache_hit"], second["latent_cache_hit"]].count(False) >= 1

    assert sample(world, "xtts_jobs_total", status="completed", language="pt") == 3
    assert sample(world, "xtts_cache_hits_total", cache="reference_audio") >= 1
    assert sample(world, "xtts_cache_misses_total", cache="latents") == 1  # conditioning ran once
    assert sample(world, "xtts_stage_duration_seconds_count", stage="upload") == 3
    assert sample(world, "xtts_jobs_in_flight") == 0 and sample(world, "xtts_queue_depth_requests") == 0
    assert sample(world, "xtts_audio_generated_seconds_total") > 0

    # Logs: each line names its job; no result URL appears.
    lines = [r.getMessage() for r in caplog.records if r.name == "server.handler"]
    assert lines and all(any(f"[{j}]" in line for j in ("job-a", "job-b", "job-c")) for line in lines)
    assert any("text: Até logo." in line for line in lines)
    assert not any(output["audio_url"] in line for output in (first, second, third) for line in lines)


async def test_output_carries_the_request_to_the_scheduler(world):
    scheduler = ScriptedScheduler()
    output = await world["handler_for"](scheduler)(
        {"id": "job-1", "input": seed_input(top_k=40, seed=7, repetition_penalty=2.0, speed=1.5)}
    )
    assert set(output) == SEED_KEYS | EXTRA_KEYS
    text = "Olá! Este é um exemplo de síntese de voz usando XTTS V2."
    duration = round(len(text) * len(spell("x")) / FakeEngine.sample_rate, 2)
    assert (output["batch_size"], output["duration"], output["reference_cache_hit"]) == (3, duration, False)
    assert uploaded_text(output["audio_url"]) == text  # the scheduler's audio is what was uploaded
    (request,) = scheduler.requests
    assert request.text == text
    assert (request.language, request.request_id) == ("pt", "job-1")
    assert (request.params.top_k, request.params.seed, request.params.speed) == (40, 7, 1.5)
    assert (request.params.temperature, request.params.top_p, request.params.repetition_penalty) == (0.7, 0.85, 2.0)
    # The latent cache is keyed by the reference's content, not its name.
    assert request.voice_key == (await world["references"].get("joao_formal", REF_URL)).sha256[:64]
    assert request.deadline is not None and request.deadline > time.monotonic()


async def test_invalid_input_is_answered_before_any_work(world):
    scheduler = ScriptedScheduler()
    output = await world["handler_for"](scheduler)({"id": "job-2", "input": seed_input(top_k=True)})
    assert output == {"error": "[invalid_type] top_k must be an integer, got a boolean", "error_code": "invalid_type"}
    assert scheduler.requests == [] and world["references"].entries == 0
    assert sample(world, "xtts_jobs_total", status="invalid", language="unknown") == 1
    assert sample(world, "xtts_jobs_in_flight") == 0


async def test_a_missing_reference_is_the_callers_error(world):
    output = await world["handler_for"](ScriptedScheduler())(
        {"id": "job-3", "input": seed_input(ref_audio_url="gs://local/referencias/nao_existe.wav")}
    )
    assert output["error_code"] == "ref_audio_not_found" and "retryable" not in output
    assert "gs://local/referencias/nao_existe.wav" in output["error"]
    assert sample(world, "xtts_jobs_total", status="invalid", language="pt") == 1


async def test_a_reference_that_is_not_audio_is_refused_and_dropped_from_the_cache(world):
    world["reference"].write_bytes(b"not audio at all" * 100)
    output = await world["handler_for"](ScriptedScheduler())({"id": "job-4", "input": seed_input()})
    assert output["error_code"] == "invalid_audio"
    assert world["references"].entries == 0  # a fixed upload is fetched afresh next time


async def test_engine_errors_keep_their_code_and_retryable_flag(world):
    output = await world["handler_for"](ScriptedScheduler(BatchError("the batch failed")))(
        {"id": "job-5", "input": seed_input()}
    )
    assert output == {"error": "[generation_failed, retryable] the batch failed", "error_code": "generation_failed",
                      "retryable": True}  # fmt: skip
    assert sample(world, "xtts_jobs_total", status="failed", language="pt") == 1


async def test_an_unexpected_error_is_reported_without_its_details(world, caplog):
    caplog.set_level(logging.INFO, logger="server.handler")
    output = await world["handler_for"](ScriptedScheduler(RuntimeError("secret detail")))(
        {"id": "job-6", "input": seed_input()}
    )
    assert output == {"error": "[internal_error] internal error (RuntimeError); see the worker's log",
                      "error_code": "internal_error"}  # fmt: skip
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure and failure[0].exc_info is not None  # the log keeps the traceback for the operator


async def test_a_job_over_its_time_limit_fails_retryably_and_leaves_the_queue(world):
    scheduler = ScriptedScheduler("hang")
    output = await world["handler_for"](scheduler, job_timeout_s=0.5)({"id": "job-7", "input": seed_input()})
    assert output["error_code"] == "job_timeout" and output["retryable"] is True
    assert "JOB_TIMEOUT_S=0.5" in output["error"]
    assert scheduler.cancelled == ["job-7"]


async def test_a_job_stopped_by_runpod_is_cancelled_inside_the_scheduler(world):
    scheduler = ScriptedScheduler("hang")
    task = asyncio.create_task(world["handler_for"](scheduler)({"id": "job-8", "input": seed_input()}))
    await scheduler.waiting.wait()
    task.cancel()  # what the SDK does when the job-stop channel names the job
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scheduler.cancelled == ["job-8"]
    assert sample(world, "xtts_jobs_total", status="cancelled", language="pt") == 1
    assert sample(world, "xtts_jobs_in_flight") == 0


def test_the_handler_is_a_plain_coroutine_function_for_the_sdk(world):
    from runpod.serverless.modules.rp_handler import is_generator

    handler = world["handler_for"](ScriptedScheduler())
    assert inspect.iscoroutinefunction(handler) and not is_generator(handler)


async def test_a_lazy_context_is_built_once_in_the_jobs_loop_and_retried_after_a_failure(world):
    from storage import StorageNotConfiguredError

    builds = []
    scheduler = ScriptedScheduler()
    handler_for_context = world["handler_for"]

    async def build():
        builds.append(asyncio.get_running_loop())
        if len(builds) == 1:
            raise StorageNotConfiguredError("GCS_BUCKET_NAME is not set")
        await asyncio.sleep(0)  # let the other first jobs queue up behind the build
        return handler_for_context.context_for(scheduler)

    handler = make_handler(build)
    failed = await handler({"id": "job-9", "input": seed_input()})
    assert failed["error_code"] == "storage_not_configured" and "GCS_BUCKET_NAME" in failed["error"]
    outputs = await asyncio.gather(*(handler({"id": f"job-{n}", "input": seed_input(gen_text=f"Job {n}.")})
                                     for n in range(10, 13)))  # fmt: skip
    assert all(set(output) == SEED_KEYS | EXTRA_KEYS for output in outputs)
    assert [uploaded_text(output["audio_url"]) for output in outputs] == ["Job 10.", "Job 11.", "Job 12."]
    assert len(builds) == 2 and builds[1] is asyncio.get_running_loop()
    assert len(scheduler.requests) == 3


async def test_concurrent_multi_segment_jobs_upload_their_own_segments_in_order(world):
    """The real Scheduler, with a fake engine whose audio spells each segment's text ('|' splits segments):
    jobs split into several segments and batched with each other each upload their own text, in order."""
    engine = FakeEngine()
    scheduler = Scheduler(engine, LatentCache(4, None, "test"), max_batch_size=3, batch_wait_s=0.05)
    await scheduler.start()
    texts = ["Um|dois|três|quatro.", "Alfa|beta.", "Sol|lua|mar.", "Uma frase só."]
    try:
        handler = world["handler_for"](scheduler)
        outputs = await asyncio.gather(
            *(handler({"id": f"job-s{n}", "input": seed_input(gen_text=t)}) for n, t in enumerate(texts)))
    finally:
        await scheduler.close()
    assert [output.get("segments") for output in outputs] == [4, 2, 3, 1], outputs
    assert [uploaded_text(output["audio_url"]) for output in outputs] == [t.replace("|", "") for t in texts]
    owner = {seg: n for n, t in enumerate(texts) for seg in t.split("|")}
    assert any(len({owner[seg] for seg in batch}) > 1 for batch in engine.batches), engine.batches  # mixed


def test_the_concurrency_modifier_is_constant():
    from server.handler import make_concurrency_modifier

    modifier = make_concurrency_modifier(32)
    assert [modifier(n) for n in (1, 8, 32, 100)] == [32, 32, 32, 32]


async def test_multi_segment_jobs_report_progress_through_the_context(world, tiny_engine):
    from batching import LatentCache, Scheduler

    scheduler = Scheduler(tiny_engine, LatentCache(4, None, "test"), max_batch_size=1, batch_wait_s=0.0)
    await scheduler.start()
    reported = []
    try:
        context = world["handler_for"].context_for(scheduler)
        context.progress = lambda job, message: reported.append((job["id"], message))
        handler = make_handler(context)
        text = "你好。" * 40  # two segments at Chinese's 82-character limit
        out = await handler({"id": "job-p", "input": seed_input(gen_text=text, language="zh-cn")})
    finally:
        await scheduler.close()
    assert out["segments"] == 2, out
    assert reported == [("job-p", "1/2 segments generated")]
