"""server.metrics: names with units, a registry per test, the HTTP endpoint, and the values real jobs feed in
(the handler and the real Scheduler, with a fake engine and local storage).

xtts_storage_retries_total and xtts_storage_errors_total are not exercised here (local storage never retries);
feeding them is issue #11's work, tested with it. No test here increments a metric by hand and reads it back."""

from __future__ import annotations

import asyncio
import types
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from batching import LatentCache, Scheduler
from server.metrics import CACHES, STAGES, Metrics, MetricsServer, SchedulerMetrics, start_metrics_server
from testing.fake_engine import SAMPLES_PER_CHAR, FakeEngine
from testing.handler_world import seed_input


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_family_is_registered_with_a_unit_in_its_name(metrics):
    names = {family.name for family in metrics.registry.collect()}
    assert names == {
        "xtts_jobs", "xtts_job_duration_seconds", "xtts_stage_duration_seconds", "xtts_batch_size_rows",
        "xtts_queue_depth_requests", "xtts_jobs_in_flight", "xtts_cache_hits", "xtts_cache_misses",
        "xtts_cache_size_bytes", "xtts_audio_generated_seconds", "xtts_real_time_factor_ratio",
        "xtts_storage_retries", "xtts_storage_errors", "xtts_gpu_memory_bytes",
        "xtts_engine_info",  # an info gauge: Prometheus's convention is the _info suffix, no unit
        "xtts_running_rows", "xtts_admitted_rows", "xtts_step_duration_seconds", "xtts_kv_cache_positions",
        "xtts_time_to_first_audio_seconds", "xtts_vocoder_frames", "xtts_preempted_rows",  # streaming
        "xtts_http_refusals", "xtts_http_clients_dropped",  # SERVER_MODE=http
    }  # fmt: skip


def test_streaming_hooks(metrics):
    hooks = SchedulerMetrics(metrics)
    hooks.span_vocoded(0.2, 75, 47)
    hooks.span_vocoded(0.3, 122, 94)
    assert value(metrics, "xtts_vocoder_frames_total", kind="vocoded") == 197
    assert value(metrics, "xtts_vocoder_frames_total", kind="given") == 141
    hooks.rows_preempted(2)
    assert value(metrics, "xtts_preempted_rows_total") == 2
    hooks.step_done(3, 0.01, 100, 1000)
    hooks.rows_evicted(1)  # rows left without a step: the gauge follows at once
    assert value(metrics, "xtts_running_rows") == 1


def test_continuous_scheduling_hooks(metrics):
    hooks = SchedulerMetrics(metrics)
    hooks.rows_admitted(3)
    hooks.step_done(rows=5, seconds=0.02, kv_positions=700, kv_budget=8320)
    assert value(metrics, "xtts_admitted_rows_total") == 3
    assert value(metrics, "xtts_running_rows") == 5
    assert value(metrics, "xtts_step_duration_seconds_count") == 1
    assert value(metrics, "xtts_kv_cache_positions", kind="in_use") == 700
    assert value(metrics, "xtts_kv_cache_positions", kind="budget") == 8320


def test_vocoder_time_is_a_stage(metrics):
    SchedulerMetrics(metrics).vocoder_done(0.5)
    assert value(metrics, "xtts_stage_duration_seconds_count", stage="vocoder") == 1
    assert value(metrics, "xtts_stage_duration_seconds_sum", stage="vocoder") == 0.5


def test_engine_info_names_the_engine_the_worker_runs(metrics):
    assert value(metrics, "xtts_engine_info", engine="stock", device="cpu", vocoder="per_row") is None
    metrics.set_engine("stock", "cpu", "per_row")
    assert value(metrics, "xtts_engine_info", engine="stock", device="cpu", vocoder="per_row") == 1


def test_two_registries_do_not_share_state():
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.record_job("completed", "pt", 1.0)
    assert value(first, "xtts_jobs_total", status="completed", language="pt") == 1
    assert value(second, "xtts_jobs_total", status="completed", language="pt") is None


def test_the_helpers_record_jobs_stages_caches_and_audio(metrics):
    metrics.record_job("completed", "pt", 2.0)
    metrics.record_job("failed", "en", -0.5)  # a clock step backwards is recorded as 0, never negative
    for stage in STAGES:
        metrics.observe_stage(stage, 0.25)
    metrics.record_cache("latents", hit=True)
    metrics.record_cache("reference_audio", hit=False)
    metrics.record_audio(audio_s=4.0, engine_s=1.0)

    assert value(metrics, "xtts_jobs_total", status="failed", language="en") == 1
    assert value(metrics, "xtts_job_duration_seconds_sum", status="completed") == 2.0
    assert value(metrics, "xtts_job_duration_seconds_sum", status="failed") == 0.0
    assert all(value(metrics, "xtts_stage_duration_seconds_count", stage=s) == 1 for s in STAGES)
    assert value(metrics, "xtts_cache_hits_total", cache="latents") == 1
    assert value(metrics, "xtts_cache_hits_total", cache="reference_audio") == 0  # present at 0 from the start
    assert value(metrics, "xtts_cache_misses_total", cache="reference_audio") == 1
    assert value(metrics, "xtts_audio_generated_seconds_total") == 4.0
    assert value(metrics, "xtts_real_time_factor_ratio_sum") == 0.25  # engine seconds per audio second


async def test_jobs_through_the_handler_and_the_scheduler_feed_every_metric_they_should(world):
    """Real observations, not values set by hand: jobs run through the handler (local storage, the reference
    cache) and the real Scheduler (a fake engine whose audio is 11 samples per character at 1000 Hz)."""
    metrics = world["metrics"]
    engine = FakeEngine()
    engine.last_vocoder_s = 0.125
    scheduler = Scheduler(engine, LatentCache(4, None, "metrics"), max_batch_size=2, batch_wait_s=0.0,
                          observer=SchedulerMetrics(metrics))  # fmt: skip
    await scheduler.start()
    handler = world["handler_for"](scheduler)
    texts = ["Um|dois.", "Três|quatro|cinco.", "Seis."]
    try:
        first = await handler({"id": "m-1", "input": seed_input(gen_text=texts[0])})  # downloads, conditions
        assert value(metrics, "xtts_jobs_in_flight") == 0
        # Two more jobs while the engine is held inside a batch: the gauges show them in flight and queued.
        engine.gate.clear()

        async def until(condition, what):
            for _ in range(1000):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"never happened: {what}")

        later = [asyncio.create_task(handler({"id": "m-2", "input": seed_input(gen_text=texts[1])}))]
        # its first 2 rows (the batch size cap) held in the engine, the third queued
        await until(lambda: scheduler.queue_depth == 1 and not scheduler.idle, "m-2's first batch held")
        later.append(asyncio.create_task(handler({"id": "m-3", "input": seed_input(gen_text=texts[2])})))
        await until(lambda: scheduler.queue_depth == 2, "m-3's row queued too")
        assert value(metrics, "xtts_jobs_in_flight") == 2 and value(metrics, "xtts_queue_depth_requests") == 2
        engine.gate.set()
        outputs = [first, *await asyncio.gather(*later)]
        invalid = await handler({"id": "m-4", "input": seed_input(top_k=0)})
        failed = await handler({"id": "m-5", "input": seed_input(gen_text="FAIL now")})
    finally:
        engine.gate.set()
        await scheduler.close()

    assert [o.get("segments") for o in outputs] == [2, 3, 1], outputs
    assert invalid["error_code"] == "out_of_range" and failed["error_code"] == "generation_failed"
    assert value(metrics, "xtts_jobs_total", status="completed", language="pt") == 3
    assert value(metrics, "xtts_jobs_total", status="invalid", language="unknown") == 1  # refused before parsing
    assert value(metrics, "xtts_jobs_total", status="failed", language="pt") == 1
    assert value(metrics, "xtts_job_duration_seconds_count", status="completed") == 3
    assert value(metrics, "xtts_jobs_in_flight") == 0 and value(metrics, "xtts_queue_depth_requests") == 0
    # Every row the engine generated is in the batch-size histogram, one observation per batch.
    rows = [len(b) for b in engine.batches]
    assert sum(rows) == 2 + 3 + 1 + 1  # the failing job's one row too
    assert value(metrics, "xtts_batch_size_rows_count") == len(rows) - 1  # ... but the failed batch is no batch done
    assert value(metrics, "xtts_batch_size_rows_sum") == sum(rows) - 1
    assert value(metrics, "xtts_stage_duration_seconds_count", stage="vocoder") == len(rows) - 1
    assert value(metrics, "xtts_stage_duration_seconds_sum", stage="vocoder") == 0.125 * (len(rows) - 1)
    # One download and one conditioning for the voice; every later job hit both caches.
    assert value(metrics, "xtts_cache_misses_total", cache="reference_audio") == 1
    assert value(metrics, "xtts_cache_hits_total", cache="reference_audio") == 3  # the invalid job never looked
    assert value(metrics, "xtts_stage_duration_seconds_count", stage="download") == 1
    assert value(metrics, "xtts_cache_size_bytes", cache="reference_audio") == world["references"].bytes > 0
    assert value(metrics, "xtts_cache_misses_total", cache="latents") == 1
    assert value(metrics, "xtts_cache_hits_total", cache="latents") == 3
    assert value(metrics, "xtts_stage_duration_seconds_count", stage="conditioning") == 1
    for stage in ("queue_wait", "generation", "encode", "upload"):  # once per completed job
        assert value(metrics, "xtts_stage_duration_seconds_count", stage=stage) == 3, stage
    audio_s = sum(len(t.replace("|", "")) * SAMPLES_PER_CHAR / FakeEngine.sample_rate for t in texts)
    assert value(metrics, "xtts_audio_generated_seconds_total") == pytest.approx(audio_s)
    assert value(metrics, "xtts_real_time_factor_ratio_count") == 3


def test_misspelled_labels_are_refused(metrics):
    with pytest.raises(ValueError, match="stage must be one of"):
        metrics.observe_stage("decode", 1.0)
    with pytest.raises(ValueError, match="cache must be one of"):
        metrics.record_cache("speaker", hit=True)
    with pytest.raises(ValueError, match="status must be one of"):
        metrics.record_job("ok", "pt", 1.0)
    assert set(CACHES) == {"reference_audio", "latents"}


def test_silent_audio_does_not_divide_by_zero(metrics):
    metrics.record_audio(audio_s=0.0, engine_s=1.0)
    assert value(metrics, "xtts_real_time_factor_ratio_count") == 0


def test_gpu_memory_is_set_only_with_cuda(metrics):
    no_cuda = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    assert metrics.update_gpu_memory(no_cuda) is False
    assert value(metrics, "xtts_gpu_memory_bytes", kind="allocated") is None

    cuda = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: True, memory_allocated=lambda: 10, memory_reserved=lambda: 20)
    )
    assert metrics.update_gpu_memory(cuda) is True
    assert value(metrics, "xtts_gpu_memory_bytes", kind="allocated") == 10
    assert value(metrics, "xtts_gpu_memory_bytes", kind="reserved") == 20


def test_port_zero_turns_the_endpoint_off():
    assert start_metrics_server(0, CollectorRegistry()) is None


def test_endpoint_serves_the_registry_over_http(metrics):
    metrics.record_job("completed", "pt", 1.5)
    server = MetricsServer.start(0, metrics.registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        server.close()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["xtts_jobs"].samples}
    assert samples[("xtts_jobs_total", (("language", "pt"), ("status", "completed")))] == 1.0
    assert "xtts_stage_duration_seconds" in families


def test_start_metrics_server_binds_the_configured_port(metrics):
    probe = MetricsServer.start(0, metrics.registry, addr="127.0.0.1")  # find a free port, then release it
    port = probe.port
    probe.close()
    server = start_metrics_server(port, metrics.registry, addr="127.0.0.1")
    try:
        assert server is not None and server.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert b"xtts_jobs_in_flight" in response.read()
    finally:
        server.close()


def test_gpu_memory_with_the_real_torch_follows_cuda_availability(metrics):
    import torch

    assert metrics.update_gpu_memory() is torch.cuda.is_available()
    allocated = value(metrics, "xtts_gpu_memory_bytes", kind="allocated")
    assert (allocated is not None) is torch.cuda.is_available()
