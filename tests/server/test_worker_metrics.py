"""server.metrics: names with units, a registry per test, and the HTTP endpoint."""

from __future__ import annotations

import types
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import CACHES, STAGES, Metrics, MetricsServer, SchedulerMetrics, start_metrics_server


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
    }  # fmt: skip


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


def test_jobs_stages_caches_and_audio(metrics):
    metrics.record_job("completed", "pt", 2.0)
    metrics.record_job("failed", "en", 0.5)
    for stage in STAGES:
        metrics.observe_stage(stage, 0.25)
    metrics.record_cache("latents", hit=True)
    metrics.record_cache("reference_audio", hit=False)
    metrics.cache_bytes.labels(cache="reference_audio").set(1234)
    metrics.batch_size.observe(8)
    metrics.queue_depth.set(5)
    metrics.jobs_in_flight.inc()
    metrics.record_audio(audio_s=4.0, engine_s=1.0)
    metrics.storage_retries.labels(reason="timeout").inc()
    metrics.storage_errors.labels(reason="not_found").inc()

    assert value(metrics, "xtts_jobs_total", status="failed", language="en") == 1
    assert value(metrics, "xtts_job_duration_seconds_sum", status="completed") == 2.0
    assert all(value(metrics, "xtts_stage_duration_seconds_count", stage=s) == 1 for s in STAGES)
    assert value(metrics, "xtts_cache_hits_total", cache="latents") == 1
    assert value(metrics, "xtts_cache_hits_total", cache="reference_audio") == 0  # present at 0 from the start
    assert value(metrics, "xtts_cache_misses_total", cache="reference_audio") == 1
    assert value(metrics, "xtts_cache_size_bytes", cache="reference_audio") == 1234
    assert value(metrics, "xtts_batch_size_rows_bucket", le="8.0") == 1
    assert value(metrics, "xtts_queue_depth_requests") == 5 and value(metrics, "xtts_jobs_in_flight") == 1
    assert value(metrics, "xtts_audio_generated_seconds_total") == 4.0
    assert value(metrics, "xtts_real_time_factor_ratio_sum") == 0.25
    assert value(metrics, "xtts_storage_retries_total", reason="timeout") == 1
    assert value(metrics, "xtts_storage_errors_total", reason="not_found") == 1


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
