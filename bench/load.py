"""The load run: offering a load point's jobs to a target (closed or open loop) and measuring each point, and the
soak, on one configuration; what each run measured is kept in a RunRecord.

    local target:   fake-gcs-server [-> FaultProxy] <- worker (`python -m server`, RunPod production loop)
                    -> FakeRunPod job service <- this load generator          (bench.stack)
    endpoint:       this load generator -> RunPod endpoint (/run + /status, or /runsync)   (bench.targets)

Every configuration is offered exactly the same jobs (bench.workload, one seeded stream per load point); what a
point yields is computed in bench.summary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.summary import MB, summarize_point, worker_metrics
from bench.targets import NOT_STARTED, JobRecord, MetricsScraper, RssSampler, new_record
from bench.workload import JobSpec, PointPlan, WorkloadSpec, make_jobs

log = logging.getLogger("bench")


RunJob = Callable[[JobSpec, float], Awaitable[JobRecord]]


async def drive(point: PointPlan, run_job: RunJob, job_timeout_s: float, point_timeout_s: float,
                on_record: Callable[[JobRecord], None] | None = None) -> tuple[list[JobRecord], float]:  # fmt: skip
    """Offer the point's jobs: closed loop (`concurrency` clients, each sends its next job when the last one is
    done) or open loop (each job at its Poisson arrival time, whatever is still running). Jobs not offered
    before the point's deadline are recorded as NOT_STARTED. Returns (records in job order, wall seconds)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + point_timeout_s
    records: dict[int, JobRecord] = {}

    def keep(job: JobSpec, record: JobRecord) -> None:
        records[job.index] = record
        if on_record is not None:
            on_record(record)

    async def one(job: JobSpec) -> None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            keep(job, new_record(job, NOT_STARTED))
            return
        keep(job, await run_job(job, min(job_timeout_s, remaining)))

    if point.mode in ("closed", "soak"):
        queue = list(reversed(point.jobs))

        async def client() -> None:
            while queue:  # bounded: every pass takes one job off a finite list
                await one(queue.pop())

        await asyncio.gather(*(client() for _ in range(max(1, point.concurrency or 1))))
    elif point.mode == "open":
        assert point.arrivals is not None

        async def arrive(job: JobSpec, at: float) -> None:
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time()) + 0.001))
            await one(job)

        await asyncio.gather(*(arrive(j, a) for j, a in zip(point.jobs, point.arrivals, strict=True)))
    else:
        raise ValueError(f"unknown load mode {point.mode!r}")
    finished = [r.finished_at for r in records.values() if r.finished_at is not None]
    end = max(finished) if finished else loop.time()
    return [records[j.index] for j in point.jobs], max(1e-9, end - start)


# ----------------------------------------------------------------------------------------- a run record


@dataclass
class RunRecord:
    """One configuration (on one worker process, or one endpoint) and everything measured on it."""

    run: str  # e.g. "baseline", "unbatched", "batched", "batched+gcs200ms"
    config: str
    gcs_latency_ms: float = 0.0
    settings: dict[str, str] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)
    soak: dict | None = None
    jobs: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run, "config": self.config, "gcs_latency_ms": self.gcs_latency_ms,
            "settings": self.settings, "worker": self.worker, "points": self.points, "soak": self.soak,
            "wall_s": round(self.wall_s, 2), "jobs": self.jobs,
        }  # fmt: skip


async def measure_points(run: RunRecord, points: Sequence[PointPlan], run_job: RunJob, *,
                         session: aiohttp.ClientSession, scraper: MetricsScraper, sampler: RssSampler,
                         job_timeout_s: float, point_timeout_s: float) -> None:  # fmt: skip
    for point in points:
        before = await scraper.scrape(session)
        t0 = time.monotonic()
        log.info("[%s] %s: %d jobs", run.run, point.label, len(point.jobs))
        records, wall = await drive(point, run_job, job_timeout_s, point_timeout_s)
        sampler.sample()
        after = await scraper.scrape(session)
        summary = summarize_point(point, records, wall, worker_metrics(before, after), sampler.peak(since=t0))
        run.points.append(summary)
        run.jobs.extend({"point": point.label, **r.as_dict()} for r in records)
        lat = summary["latency_s"]
        log.info("[%s] %s: %d/%d ok in %.1f s, %.3f jobs/s, %.3f audio-s/s, p50 %s s, p95 %s s", run.run,
                 point.label, summary["completed"], summary["jobs"], wall, summary["jobs_per_s"] or 0,
                 summary["audio_s_per_s"] or 0, lat["p50"], lat["p95"])  # fmt: skip


async def soak(run: RunRecord, spec: WorkloadSpec, jobs: int, concurrency: int, warmup_jobs: int,
               run_job: RunJob, *, session: aiohttp.ClientSession, scraper: MetricsScraper, sampler: RssSampler,
               job_timeout_s: float, timeout_s: float) -> None:  # fmt: skip
    """`jobs` jobs in a closed loop; RSS (sampled every interval) after the first `warmup_jobs` vs at the end."""
    point = PointPlan("soak", make_jobs(spec, jobs, "soak"), concurrency=concurrency)
    done = 0
    marks: dict[str, float] = {}

    def on_record(_: JobRecord) -> None:
        nonlocal done
        done += 1
        if done == warmup_jobs:
            marks["warm"] = time.monotonic()
            sampler.sample()

    before = await scraper.scrape(session)
    t0 = time.monotonic()
    sampler.sample()
    log.info("[%s] soak: %d jobs at concurrency %d", run.run, jobs, concurrency)
    records, wall = await drive(point, run_job, job_timeout_s, timeout_s, on_record)
    end_rss = sampler.sample()
    after = await scraper.scrape(session)
    summary = summarize_point(point, records, wall, worker_metrics(before, after), sampler.peak(since=t0))
    warm_rss = sampler.at(marks["warm"]) if "warm" in marks else None
    series = [(round(t - t0, 2), round(rss / MB, 1)) for t, rss in sampler.samples if t >= t0]
    growth = (end_rss - warm_rss) if (end_rss and warm_rss) else None
    summary["rss"] = {
        "interval_s": sampler.interval_s,
        "warmup_jobs": warmup_jobs,
        "warmup_at_s": round(marks["warm"] - t0, 2) if "warm" in marks else None,
        "after_warmup_mb": round(warm_rss / MB, 1) if warm_rss else None,
        "end_mb": round(end_rss / MB, 1) if end_rss else None,
        "growth_mb": round(growth / MB, 1) if growth is not None else None,
        "growth_pct": round(100.0 * growth / warm_rss, 2) if growth is not None else None,
        # RSS saw-tooths with every batch (activations allocated, then freed), so one sample can land on a peak
        # or a trough. The first and last quarters of the time after warm-up, each as (min, max): a rising
        # floor (min) is what a leak looks like; a rising ceiling (max) is a larger peak per batch.
        **rss_windows(series, marks["warm"] - t0 if "warm" in marks else 0.0),
        "series_s_mb": series,
    }
    run.soak = summary
    run.jobs.extend({"point": "soak", **r.as_dict()} for r in records)
    log.info("[%s] soak: %d/%d ok, RSS %s MB after warm-up -> %s MB at the end (%s MB, %s%%)", run.run,
             summary["completed"], summary["jobs"], summary["rss"]["after_warmup_mb"], summary["rss"]["end_mb"],
             summary["rss"]["growth_mb"], summary["rss"]["growth_pct"])  # fmt: skip


def rss_windows(series: Sequence[tuple[float, float]], warm_at_s: float) -> dict[str, Any]:
    """min/max RSS (MB) over the first and the last quarter of the samples taken after warm-up, and how much
    the floor (min) and the ceiling (max) moved between them."""
    after = [(t, mb) for t, mb in series if t >= warm_at_s]
    if len(after) < 4:
        return {"first_quarter_mb": None, "last_quarter_mb": None, "floor_growth_mb": None,
                "ceiling_growth_mb": None}  # fmt: skip
    start, end = after[0][0], after[-1][0]
    span = (end - start) / 4
    first = [mb for t, mb in after if t <= start + span] or [after[0][1]]
    last = [mb for t, mb in after if t >= end - span] or [after[-1][1]]
    return {
        "first_quarter_mb": [min(first), max(first)],
        "last_quarter_mb": [min(last), max(last)],
        "floor_growth_mb": round(min(last) - min(first), 1),
        "ceiling_growth_mb": round(max(last) - max(first), 1),
    }
