"""The numbers a load point yields: what the client measured (latency, throughput, real-time factor), what the
worker's Prometheus endpoint says happened between two scrapes, and the ratios between two runs' matching points."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.stats import Snapshot, counter_delta, hit_rate, histogram_delta, rate, ratio, summarize
from bench.targets import JobRecord
from bench.workload import PointPlan

MB = 1024 * 1024
SHORT_JOB_CHARS = 60  # "short jobs" in reports: replies a user waits on


def worker_metrics(before: Snapshot | None, after: Snapshot | None) -> dict[str, Any] | None:
    """What the worker's Prometheus endpoint says happened between two scrapes."""
    if before is None or after is None:
        return None
    caches = {}
    for cache in ("latents", "reference_audio"):
        hits = counter_delta(before, after, "xtts_cache_hits_total", cache=cache)
        misses = counter_delta(before, after, "xtts_cache_misses_total", cache=cache)
        caches[cache] = {"hits": int(hits), "misses": int(misses), "hit_rate": hit_rate(hits, misses)}
    stages = {}
    for stage in ("queue_wait", "download", "conditioning", "generation", "vocoder", "encode", "upload"):
        h = histogram_delta(before, after, "xtts_stage_duration_seconds", stage=stage)
        if h["count"]:
            stages[stage] = {"count": h["count"], "mean_s": h["mean"], "sum_s": h["sum"]}
    jobs = {}
    for labels, value in after.series("xtts_jobs_total").items():
        status = dict(labels).get("status", "?")
        jobs[status] = jobs.get(status, 0) + int(value - before.samples.get(("xtts_jobs_total", labels), 0.0))
    gpu = {dict(labels).get("kind", "?"): int(v) for labels, v in after.series("xtts_gpu_memory_bytes").items()}
    rtf = histogram_delta(before, after, "xtts_real_time_factor_ratio")
    engine = [dict(labels) for labels, v in after.series("xtts_engine_info").items() if v == 1]
    return {
        "engine": engine[0] if engine else None,
        "batch_size_rows": histogram_delta(before, after, "xtts_batch_size_rows"),
        "caches": caches,
        "stages": stages,
        "jobs": {k: v for k, v in jobs.items() if v},
        "audio_seconds": round(counter_delta(before, after, "xtts_audio_generated_seconds_total"), 3),
        "real_time_factor_mean": rtf["mean"],
        "gpu_memory_bytes": gpu or None,
    }


def summarize_point(point: PointPlan, records: Sequence[JobRecord], wall_s: float,
                    metrics: dict | None = None, peak_rss: int | None = None) -> dict[str, Any]:  # fmt: skip
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    audio = sum(r.audio_s or 0.0 for r in done)
    chars = sum(r.chars for r in done)
    return {
        "label": point.label,
        "mode": point.mode,
        "concurrency": point.concurrency,
        "rate": point.rate,
        "jobs": len(records),
        "completed": len(done),
        "errors": len(failed),
        "error_kinds": dict(Counter(r.status for r in failed)),
        "error_samples": [f"{r.status}: {r.error}" for r in failed[:5]],
        "wall_s": round(wall_s, 3),
        "chars": chars,
        "audio_s": round(audio, 3),
        "jobs_per_s": rate(len(done), wall_s),
        "chars_per_s": rate(chars, wall_s, 2),
        "audio_s_per_s": rate(audio, wall_s),
        # Aggregate real-time factor: wall seconds per second of audio produced (< 1: faster than real time).
        "rtf": round(wall_s / audio, 4) if audio > 0 else None,
        "latency_s": summarize(r.latency_s for r in done),
        "latency_short_s": summarize(r.latency_s for r in done if r.chars <= SHORT_JOB_CHARS),
        "first_audio_s": summarize(r.first_audio_s for r in done),  # streamed jobs only
        "platform_queue_s": summarize(r.platform_queue_s for r in done),
        "queue_wait_s": summarize(r.queue_wait_s for r in done),
        "synthesis_s": summarize(r.synthesis_s for r in done),
        "worker_total_s": summarize(r.worker_total_s for r in done),
        "execution_s": summarize(r.execution_s for r in done),
        "job_batch_sizes": {str(k): v for k, v in sorted(Counter(r.batch_size for r in done if r.batch_size).items())},
        "latent_cache_hit_rate_jobs": _share(r.latent_cache_hit for r in done),
        "reference_cache_hit_rate_jobs": _share(r.reference_cache_hit for r in done),
        "worker_metrics": metrics,
        "peak_rss_mb": round(peak_rss / MB, 1) if peak_rss else None,
    }


def _share(flags) -> float | None:
    values = [f for f in flags if f is not None]
    return round(sum(values) / len(values), 4) if values else None


def compare_points(numerator: dict, denominator: dict) -> dict[str, Any]:
    """Ratios of two runs' matching points (numerator / denominator; for latency < 1 means lower)."""
    out = []
    by_label = {p["label"]: p for p in denominator["points"]}
    for p in numerator["points"]:
        q = by_label.get(p["label"])
        if q is None:
            continue
        out.append({
            "label": p["label"],
            "audio_s_per_s": ratio(p["audio_s_per_s"], q["audio_s_per_s"]),
            "jobs_per_s": ratio(p["jobs_per_s"], q["jobs_per_s"]),
            "chars_per_s": ratio(p["chars_per_s"], q["chars_per_s"]),
            "p50_latency": ratio(p["latency_s"]["p50"], q["latency_s"]["p50"]),
            "p95_latency": ratio(p["latency_s"]["p95"], q["latency_s"]["p95"]),
            "p99_latency": ratio(p["latency_s"]["p99"], q["latency_s"]["p99"]),
            "p50_latency_short": ratio((p.get("latency_short_s") or {}).get("p50"),
                                       (q.get("latency_short_s") or {}).get("p50")),
            # Streamed jobs: time to first audio against the other side's whole latency for the same jobs.
            "p50_first_audio": ratio((p.get("first_audio_s") or {}).get("p50"), q["latency_s"]["p50"]),
            "p95_first_audio": ratio((p.get("first_audio_s") or {}).get("p95"), q["latency_s"]["p95"]),
            # The same jobs must give the same audio (demo lengths follow the text): a check that both sides
            # were offered, and completed, the same work.
            "same_audio": bool(p.get("audio_s") and q.get("audio_s")
                               and abs(p["audio_s"] - q["audio_s"]) <= 0.01 * q["audio_s"]),
        })  # fmt: skip
    return {"numerator": numerator["run"], "denominator": denominator["run"], "points": out}
