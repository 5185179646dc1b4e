"""server.jobs: one job's life (begin, deadline, in-flight count, failure to output, metrics), each path once, with
a clock moved by hand and no scheduler."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from batching import SpeechResult
from batching.errors import BatchError, JobTimeoutError
from server.jobs import InFlight, JobCore, runpod_job_id
from server.metrics import Metrics
from server.validation import ValidationError, validate_request
from testing.fake_engine import Clock


@pytest.fixture
def core():
    return JobCore(10.0, Metrics(CollectorRegistry()), Clock(100.0))


def sample(core: JobCore, name: str, **labels) -> float | None:
    return core.metrics.registry.get_sample_value(name, labels)


def request(language: str = "en"):
    return validate_request({"gen_text": "Hello.", "ref_audio_url": "gs://refs/a.wav", "voice_id": "a",
                             "language": language}, max_text_chars=100, default_language="pt")  # fmt: skip


def test_a_job_begins_with_its_id_log_start_and_deadline(core):
    scope = core.job("job-1", {"id": "job-1", "input": {}})
    job = scope.job
    assert (job.id, job.started, job.deadline, job.raw) == ("job-1", 100.0, 110.0, {"id": "job-1", "input": {}})
    assert job.language == "unknown" and job.request is None and job.output is None and not job.failed
    assert job.log.logger.name == "server.handler" and job.log.extra == {"job_id": "job-1"}
    assert (runpod_job_id({"id": 7}), runpod_job_id({}), runpod_job_id(None)) == ("7", "-", "-")


async def test_a_completed_job_is_counted_with_its_duration_and_leaves_the_in_flight_count(core):
    async with core.job("job-2") as job:
        assert core.in_flight.count == 1 and sample(core, "xtts_jobs_in_flight") == 1
        job.request = request("en")
        core.clock.now += 2.5
        job.output = {"ok": True}
    assert job.output == {"ok": True} and not job.failed
    assert core.in_flight.count == 0 and sample(core, "xtts_jobs_in_flight") == 0
    assert sample(core, "xtts_jobs_total", status="completed", language="en") == 1
    assert sample(core, "xtts_job_duration_seconds_sum", status="completed") == 2.5


async def test_a_failure_becomes_the_jobs_error_output(core, caplog):
    caplog.set_level(logging.INFO, logger="server.handler")
    async with core.job("job-3") as job:
        job.request = request("pt")
        raise BatchError("the batch failed")
    assert job.failed and job.output == {"error": "[generation_failed, retryable] the batch failed",
                                         "error_code": "generation_failed", "retryable": True}  # fmt: skip
    assert sample(core, "xtts_jobs_total", status="failed", language="pt") == 1
    assert core.in_flight.count == 0
    assert any(r.getMessage() == "[job-3] ✗ [generation_failed, retryable] the batch failed" for r in caplog.records)


async def test_a_callers_mistake_is_counted_invalid_and_an_unknown_error_shows_no_details(core, caplog):
    async with core.job("job-4") as job:
        raise ValidationError("top_k must be an integer", error_code="invalid_type", field="top_k")
    assert job.output["error_code"] == "invalid_type"
    assert sample(core, "xtts_jobs_total", status="invalid", language="unknown") == 1
    async with core.job("job-5") as job:
        raise RuntimeError("secret detail")
    assert job.output == {"error": "[internal_error] internal error (RuntimeError); see the worker's log",
                          "error_code": "internal_error"}  # fmt: skip
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and "secret detail" not in record.getMessage()


async def test_with_errors_raise_a_failure_is_counted_then_raised(core):
    with pytest.raises(BatchError):
        async with core.job("http-1", errors="raise") as job:
            raise BatchError("the batch failed")
    assert job.failed and job.output["error_code"] == "generation_failed"
    assert sample(core, "xtts_jobs_total", status="failed", language="unknown") == 1
    assert core.in_flight.count == 0
    with pytest.raises(ValueError, match="errors must be 'output' or 'raise'"):
        core.job("x", errors="ignore")


async def test_a_stopped_job_is_logged_counted_cancelled_and_the_stop_goes_on(core, caplog):
    caplog.set_level(logging.INFO, logger="server.handler")
    with pytest.raises(asyncio.CancelledError):
        async with core.job("job-6"):
            core.clock.now += 1.25
            raise asyncio.CancelledError
    with pytest.raises(GeneratorExit):
        async with core.job("job-7", stopped="request stopped after %.2f s (the client went away)"):
            raise GeneratorExit
    assert sample(core, "xtts_jobs_total", status="cancelled", language="unknown") == 2
    assert core.in_flight.count == 0
    lines = [r.getMessage() for r in caplog.records]
    assert "[job-6] job stopped by RunPod after 1.25 s" in lines
    assert "[job-7] request stopped after 0.00 s (the client went away)" in lines


async def test_the_deadline_is_the_jobs_own_and_names_job_timeout_s():
    core = JobCore(0.2, None, asyncio.get_running_loop().time)
    async with core.job("job-8") as job:
        async with core.deadline(job):
            await asyncio.sleep(0.01)  # well within: nothing happens
        with pytest.raises(JobTimeoutError, match=r"JOB_TIMEOUT_S=0.2 s"):
            async with core.deadline(job):
                await asyncio.sleep(5)
    assert job.output is None and not job.failed  # caught inside the block: the job itself goes on


async def test_a_timeout_from_inside_is_not_the_jobs(core):
    async with core.job("job-9") as job:
        with pytest.raises(TimeoutError) as info:
            async with core.deadline(job):
                raise TimeoutError("storage took too long")
    assert not isinstance(info.value, JobTimeoutError)


async def test_in_time_bounds_each_item_but_not_the_readers_time():
    core = JobCore(0.3, None, asyncio.get_running_loop().time)

    async def items(pause_s):
        for n in range(3):
            await asyncio.sleep(pause_s)
            yield n

    async with core.job("job-10") as job:
        got = []
        async for n in core.in_time(job, items(0.0)):
            got.append(n)
        assert got == [0, 1, 2]
        with pytest.raises(JobTimeoutError):
            async for _ in core.in_time(job, items(1.0)):
                pass


async def test_refused_counts_an_invalid_job_without_an_in_flight_slot(core):
    output = core.refused("http-2", ValidationError("voice is required", error_code="missing_field", field="voice"))
    assert output == {"error": "[missing_field] voice is required", "error_code": "missing_field"}
    assert sample(core, "xtts_jobs_total", status="invalid", language="unknown") == 1
    assert sample(core, "xtts_jobs_in_flight") == 0


async def test_observe_and_first_audio_feed_the_metrics_once(core):
    result = SpeechResult(wav=None, sample_rate=24000, duration_s=2.0, segments=1, queue_wait_s=0.5, engine_s=1.0,
                          conditioning_s=0.1, latent_cache_hit=True, batch_sizes=(2,))  # fmt: skip
    async with core.job("job-11") as job:
        core.observe(job, result, 1.5)
        core.clock.now += 0.4
        assert core.first_audio(job) == pytest.approx(0.4)
        core.clock.now += 1.0
        assert core.first_audio(job) == pytest.approx(0.4)  # once: the first
    assert sample(core, "xtts_stage_duration_seconds_sum", stage="queue_wait") == 0.5
    assert sample(core, "xtts_stage_duration_seconds_sum", stage="generation") == 1.0
    assert sample(core, "xtts_audio_generated_seconds_total") == 2.0
    assert sample(core, "xtts_time_to_first_audio_seconds_count") == 1


async def test_in_flight_counts_and_says_when_idle():
    count = InFlight()
    count.enter()
    count.enter()
    waiter = asyncio.ensure_future(count.wait_idle())
    count.leave()
    await asyncio.sleep(0)
    assert not waiter.done() and count.count == 1
    count.leave()
    await asyncio.wait_for(waiter, 1.0)
    assert count.count == 0
