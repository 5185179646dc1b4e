"""Prometheus metrics of the worker, on a registry the caller owns (tests make their own; nothing global).

Names carry their unit; labels are small closed sets:

    xtts_jobs_total{status,language}                 counter    status: completed | failed | invalid | cancelled
    xtts_job_duration_seconds{status}                histogram  end to end, from the handler's start to its reply
    xtts_stage_duration_seconds{stage}               histogram  stage: queue_wait, download, conditioning,
                                                                generation, vocoder, encode, upload (per job,
                                                                but vocoder: per batch, the HiFi-GAN part of it)
    xtts_batch_size_rows                             histogram  rows in each GPU batch (continuous scheduling:
                                                                rows in each decoding step)
    xtts_running_rows                                gauge      continuous: rows in the running batch
    xtts_admitted_rows_total                         counter    rows admitted into the engine (continuous: into
                                                                the running batch; a retried row counts again)
    xtts_step_duration_seconds                       histogram  continuous: one decoding step of the whole batch
    xtts_kv_cache_positions{kind}                    gauge      continuous: KV-cache positions, kind: in_use |
                                                                budget (MAX_BATCH_TOKENS, shrunk after an OOM)
    xtts_queue_depth_requests                        gauge      requests waiting for the GPU
    xtts_jobs_in_flight                              gauge      jobs inside the handler now
    xtts_cache_hits_total{cache} / _misses_total     counter    cache: reference_audio | latents
    xtts_cache_size_bytes{cache}                     gauge
    xtts_audio_generated_seconds_total               counter    seconds of audio produced
    xtts_real_time_factor_ratio                      histogram  engine seconds / audio seconds (< 1 is faster
                                                                than real time)
    xtts_storage_retries_total{reason}               counter    reason: 429 | 5xx | timeout | connection
    xtts_storage_errors_total{reason}                counter    reason: the error code of an operation that
                                                                failed for good (storage_unavailable,
                                                                ref_audio_not_found, ...)
    xtts_gpu_memory_bytes{kind}                      gauge      kind: allocated | reserved; only with CUDA
    xtts_engine_info{engine,device,vocoder}          gauge      1 for the engine this worker runs (set once)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("queue_wait", "download", "conditioning", "generation", "vocoder", "encode", "upload")
CACHES: tuple[str, ...] = ("reference_audio", "latents")
JOB_STATUSES: tuple[str, ...] = ("completed", "failed", "invalid", "cancelled")

# Seconds: from a cache hit's microseconds to a long text's minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """All of the worker's metrics, registered on `registry`. One instance per worker process."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.jobs = Counter(
            "xtts_jobs_total", "Jobs finished, by outcome and language.", ["status", "language"], registry=registry
        )
        self.job_duration = Histogram(
            "xtts_job_duration_seconds",
            "End-to-end job time inside the worker, from the handler's start to its reply.",
            ["status"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "xtts_stage_duration_seconds",
            "Time spent in one stage of a job.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "xtts_batch_size_rows", "Rows in each GPU batch.", buckets=_BATCH_BUCKETS, registry=registry
        )
        self.running_rows = Gauge("xtts_running_rows", "Rows in the running batch.", registry=registry)
        self.admissions = Counter(
            "xtts_admitted_rows_total", "Rows admitted into the engine.", registry=registry
        )
        self.step_duration = Histogram(
            "xtts_step_duration_seconds", "One decoding step of the running batch.", buckets=_STEP_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.kv_positions = Gauge(
            "xtts_kv_cache_positions", "KV-cache positions held by the running batch, and its budget.", ["kind"],
            registry=registry,
        )  # fmt: skip
        self.time_to_first_audio = Histogram(
            "xtts_time_to_first_audio_seconds",
            "Streamed jobs (STREAMING=on): from the handler's start to the first audio chunk handed to RunPod.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.vocoder_frames = Counter(
            "xtts_vocoder_frames_total",
            "Streamed rows: vocoder frames given out (kind=given) and run through HiFi-GAN, margins included "
            "(kind=vocoded); vocoded/given is the streaming overhead.",
            ["kind"],
            registry=registry,
        )
        self.http_refusals = Counter(
            "xtts_http_refusals_total",
            "SERVER_MODE=http: requests refused before they became jobs, by code (invalid_api_key, worker_starting, "
            "worker_shutting_down, over_capacity, too_many_connections, request_too_large, request_timeout, invalid_json, "
            "not_found, ...).",
            ["code"],
            registry=registry,
        )
        self.http_dropped = Counter(
            "xtts_http_clients_dropped_total",
            "SERVER_MODE=http: responses cut off because the client took none of their bytes for "
            "HTTP_WRITE_TIMEOUT_S (reason=write_timeout); their jobs count as cancelled.",
            ["reason"],
            registry=registry,
        )
        self.preempted_rows = Counter(
            "xtts_preempted_rows_total",
            "Running later segments of streamed jobs sent back to the queue so that another stream's first segment "
            "could start (each at most once; it restarts from its prompt).",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "xtts_queue_depth_requests", "Requests waiting for the GPU scheduler.", registry=registry
        )
        self.jobs_in_flight = Gauge("xtts_jobs_in_flight", "Jobs inside the handler now.", registry=registry)
        self.cache_hits = Counter("xtts_cache_hits_total", "Cache hits.", ["cache"], registry=registry)
        self.cache_misses = Counter("xtts_cache_misses_total", "Cache misses.", ["cache"], registry=registry)
        self.cache_bytes = Gauge("xtts_cache_size_bytes", "Bytes held by a cache.", ["cache"], registry=registry)
        self.audio_seconds = Counter(
            "xtts_audio_generated_seconds_total", "Seconds of audio generated.", registry=registry
        )
        self.real_time_factor = Histogram(
            "xtts_real_time_factor_ratio",
            "Engine seconds per second of audio, per request.",
            buckets=_RTF_BUCKETS,
            registry=registry,
        )
        self.storage_retries = Counter(
            "xtts_storage_retries_total", "Storage operations retried, by reason.", ["reason"], registry=registry
        )
        self.storage_errors = Counter(
            "xtts_storage_errors_total", "Storage operations that failed for good, by reason.", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.gpu_memory = Gauge(
            "xtts_gpu_memory_bytes", "CUDA memory held by the worker's torch allocator.", ["kind"], registry=registry
        )
        self.engine_info = Gauge(
            "xtts_engine_info", "The engine this worker runs (value 1).", ["engine", "device", "vocoder"],
            registry=registry,
        )  # fmt: skip
        # Show every cache and stage at 0 from the start, so dashboards and rate() see the series before the
        # first event.
        for cache in CACHES:
            self.cache_hits.labels(cache=cache)
            self.cache_misses.labels(cache=cache)
            self.cache_bytes.labels(cache=cache)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)

    # Small helpers so callers do not repeat label names (and cannot misspell a stage).

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        self.stage_duration.labels(stage=stage).observe(max(0.0, seconds))

    def record_job(self, status: str, language: str, seconds: float) -> None:
        if status not in JOB_STATUSES:
            raise ValueError(f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        self.jobs.labels(status=status, language=language).inc()
        self.job_duration.labels(status=status).observe(max(0.0, seconds))

    def record_cache(self, cache: str, hit: bool) -> None:
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        (self.cache_hits if hit else self.cache_misses).labels(cache=cache).inc()

    def record_audio(self, audio_s: float, engine_s: float) -> None:
        """One request's audio: adds its seconds and observes its real-time factor."""
        if audio_s > 0:
            self.audio_seconds.inc(audio_s)
            self.real_time_factor.observe(max(0.0, engine_s) / audio_s)

    def set_engine(self, engine: str, device: str, vocoder: str) -> None:
        self.engine_info.labels(engine=engine, device=device, vocoder=vocoder).set(1)

    def update_gpu_memory(self, torch_module: Any = None) -> bool:
        """Set the GPU memory gauge from torch's allocator; False (and nothing set) without CUDA.

        torch is never imported here: if the process has not loaded it, there is no GPU memory to report.
        `torch_module` replaces the loaded torch (tests).
        """
        torch = torch_module if torch_module is not None else sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return False
        self.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
        self.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())
        return True


class SchedulerMetrics:
    """The batching scheduler's observer hooks (batching.Observer, duck-typed) feeding these metrics.

    The scheduler calls them on the event loop: once per batch, at each change of queue depth, and once per
    request after its speaker latents were looked up (computed, or found in the latent cache). Under continuous
    scheduling, `batch_done` and `step_done` come once per decoding step and `vocoder_done` once per vocoded row.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def batch_done(self, size: int, seconds: float, tokens: int) -> None:
        self.metrics.batch_size.observe(size)
        # Keep xtts_gpu_memory_bytes current (it was set once at start only, so a memory alert could never
        # fire): after each batch is when the allocator's figures move. Without CUDA this does nothing.
        self.metrics.update_gpu_memory()

    def queue_depth(self, segments: int) -> None:
        self.metrics.queue_depth.set(segments)

    def conditioning_done(self, seconds: float, hit: bool) -> None:
        self.metrics.record_cache("latents", hit)
        if not hit:
            self.metrics.observe_stage("conditioning", seconds)

    def rows_failed(self, count: int, error: BaseException) -> None:
        log.debug("%d row(s) failed: %s", count, type(error).__name__)

    def vocoder_done(self, seconds: float) -> None:
        self.metrics.observe_stage("vocoder", seconds)

    def step_done(self, rows: int, seconds: float, kv_positions: int, kv_budget: int) -> None:
        self.metrics.running_rows.set(rows)
        self.metrics.step_duration.observe(max(0.0, seconds))
        self.metrics.kv_positions.labels(kind="in_use").set(kv_positions)
        self.metrics.kv_positions.labels(kind="budget").set(kv_budget)

    def rows_admitted(self, count: int) -> None:
        self.metrics.admissions.inc(count)

    def rows_evicted(self, running: int) -> None:
        self.metrics.running_rows.set(running)

    def span_vocoded(self, seconds: float, frames: int, given: int) -> None:
        self.metrics.vocoder_frames.labels(kind="vocoded").inc(frames)
        self.metrics.vocoder_frames.labels(kind="given").inc(given)

    def rows_preempted(self, count: int) -> None:
        self.metrics.preempted_rows.inc(count)


class StorageMetrics:
    """The storage retry loop's observer (storage.retry.RetryObserver) feeding the storage counters."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def retried(self, reason: str) -> None:
        self.metrics.storage_retries.labels(reason=reason).inc()

    def failed(self, reason: str) -> None:
        self.metrics.storage_errors.labels(reason=reason).inc()


@dataclass
class MetricsServer:
    """The HTTP endpoint (`GET /metrics` or any path) serving one registry, in a daemon thread."""

    server: object
    thread: object
    port: int

    @classmethod
    def start(cls, port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> MetricsServer:
        """Bind `addr:port` (0 picks a free port) and serve; raises OSError when the port is taken."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=addr, registry=registry)
        return cls(server=server, thread=thread, port=server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> MetricsServer | None:
    """Serve `registry` on METRICS_PORT; port 0 means off (returns None)."""
    if port == 0:
        log.info("metrics endpoint off (METRICS_PORT=0)")
        return None
    server = MetricsServer.start(port, registry, addr)
    log.info("metrics endpoint on http://%s:%d/metrics", addr, server.port)
    return server
