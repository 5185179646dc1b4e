"""Load points driven against a stand-in target (no worker): closed and open loops, deadlines, summaries."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.load import drive
from bench.summary import compare_points, summarize_point
from bench.targets import NOT_STARTED, JobRecord, new_record
from bench.workload import PointPlan, WorkloadSpec, make_jobs, plan_points
from testing.runpod_fake import COMPLETED, FAILED


class StandIn:
    """A target whose jobs take `seconds` each and produce 1 s of audio; counts jobs in flight."""

    def __init__(self, seconds: float = 0.02, fail: set[int] = frozenset()):
        self.seconds = seconds
        self.fail = fail
        self.in_flight = 0
        self.peak = 0
        self.started: list[float] = []

    async def run_job(self, job, timeout_s: float) -> JobRecord:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        record = new_record(job, COMPLETED)
        record.submitted_at = time.monotonic()
        self.started.append(record.submitted_at)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.in_flight -= 1
        record.finished_at = time.monotonic()
        record.latency_s = record.finished_at - record.submitted_at
        if job.index in self.fail:
            record.status, record.error = FAILED, "boom"
        else:
            record.take_output({"duration": 1.0, "queue_wait": 0.01, "generation_time": 0.5, "batch_size": 2,
                                "latent_cache_hit": True, "reference_cache_hit": False})
        return record


def test_points_offer_the_same_jobs_for_every_configuration():
    spec = WorkloadSpec(seed=5)
    a = plan_points(spec, 12, [1, 4], [0.5])
    b = plan_points(WorkloadSpec(seed=5), 12, [1, 4], [0.5])
    assert [p.label for p in a] == ["closed@c1", "closed@c4", "open@0.5/s"]
    assert [p.jobs for p in a] == [p.jobs for p in b]
    assert a[2].arrivals == b[2].arrivals and len(a[2].arrivals) == 12
    assert a[0].jobs != a[1].jobs  # each point its own stream


async def test_closed_loop_keeps_exactly_concurrency_jobs_in_flight():
    target = StandIn()
    point = PointPlan("closed", make_jobs(WorkloadSpec(), 12, "x"), concurrency=4)
    records, wall = await drive(point, target.run_job, job_timeout_s=5, point_timeout_s=30)
    assert target.peak == 4
    assert [r.index for r in records] == list(range(12)) and all(r.ok for r in records)
    assert 3 * 0.02 <= wall < 2.0  # 12 jobs / 4 clients = 3 rounds


async def test_open_loop_sends_at_the_arrival_times_whatever_is_running():
    target = StandIn(seconds=0.3)
    jobs = make_jobs(WorkloadSpec(), 4, "o")
    point = PointPlan("open", jobs, rate=10, arrivals=[0.0, 0.05, 0.1, 0.15])
    records, _ = await drive(point, target.run_job, job_timeout_s=5, point_timeout_s=30)
    assert target.peak == 4  # arrivals do not wait for earlier jobs
    offsets = [t - target.started[0] for t in target.started]
    assert offsets == pytest.approx([0.0, 0.05, 0.1, 0.15], abs=0.04)
    assert all(r.ok for r in records)


async def test_jobs_past_the_point_deadline_are_not_started_and_count_as_errors():
    target = StandIn(seconds=0.2)
    point = PointPlan("closed", make_jobs(WorkloadSpec(), 6, "d"), concurrency=1)
    records, wall = await drive(point, target.run_job, job_timeout_s=5, point_timeout_s=0.3)
    statuses = [r.status for r in records]
    assert statuses[:2] == [COMPLETED, COMPLETED] and set(statuses[2:]) == {NOT_STARTED}
    summary = summarize_point(point, records, wall)
    assert summary["errors"] == 4 and summary["error_kinds"] == {NOT_STARTED: 4}


async def test_point_summary_throughput_latency_and_worker_view():
    target = StandIn(fail={3})
    point = PointPlan("closed", make_jobs(WorkloadSpec(), 8, "s"), concurrency=2)
    records, wall = await drive(point, target.run_job, job_timeout_s=5, point_timeout_s=30)
    s = summarize_point(point, records, 2.0, metrics=None, peak_rss=300 * 1024 * 1024)
    ok = [r for r in records if r.ok]
    assert (s["jobs"], s["completed"], s["errors"]) == (8, 7, 1)
    assert s["error_samples"] == ["FAILED: boom"]
    assert s["jobs_per_s"] == 3.5 and s["audio_s_per_s"] == 3.5 and s["audio_s"] == 7.0
    assert s["chars_per_s"] == round(sum(r.chars for r in ok) / 2.0, 2)
    assert s["rtf"] == round(2.0 / 7.0, 4)
    assert s["latency_s"]["n"] == 7 and s["queue_wait_s"]["p50"] == 0.01
    assert s["synthesis_s"]["p50"] == pytest.approx(0.49)
    assert s["job_batch_sizes"] == {"2": 7} and s["latent_cache_hit_rate_jobs"] == 1.0
    assert s["reference_cache_hit_rate_jobs"] == 0.0 and s["peak_rss_mb"] == 300.0


def test_compare_points_gives_ratios_of_matching_points():
    def run(name, thr, p95):
        return {"run": name, "points": [
            {"label": "closed@c1", "audio_s": 10 * thr[0], "audio_s_per_s": thr[0], "jobs_per_s": thr[0],
             "chars_per_s": thr[0],
             "latency_s": {"p50": p95[0], "p95": p95[0], "p99": p95[0]}},
            {"label": "closed@c16", "audio_s": 10 * thr[1], "audio_s_per_s": thr[1], "jobs_per_s": thr[1],
             "chars_per_s": thr[1],
             "latency_s": {"p50": p95[1], "p95": p95[1], "p99": p95[1]}},
        ]}  # fmt: skip

    c = compare_points(run("batched", (1.0, 4.0), (2.0, 5.0)), run("baseline", (0.5, 1.0), (4.0, 20.0)))
    assert c["numerator"] == "batched" and c["denominator"] == "baseline"
    assert [(p["label"], p["audio_s_per_s"], p["p95_latency"]) for p in c["points"]] == [
        ("closed@c1", 2.0, 0.5), ("closed@c16", 4.0, 0.25)]
    assert [p["same_audio"] for p in c["points"]] == [False, False]  # 10 s vs 5 s of audio: not the same work
    same = compare_points(run("a", (1.0, 4.0), (1, 1)), run("b", (1.0, 4.0), (1, 1)))
    assert [p["same_audio"] for p in same["points"]] == [True, True]


def test_rss_windows_tell_a_rising_floor_from_a_saw_tooth():
    from bench.load import rss_windows

    saw = [(t, 1000.0 + (500.0 if t % 4 == 2 else 0.0)) for t in range(0, 100)]
    w = rss_windows(saw, warm_at_s=10)
    assert w["first_quarter_mb"] == [1000.0, 1500.0] and w["floor_growth_mb"] == 0 and w["ceiling_growth_mb"] == 0
    leak = [(t, 1000.0 + 5 * t) for t in range(0, 100)]
    w = rss_windows(leak, warm_at_s=0)
    assert w["floor_growth_mb"] > 300 and w["last_quarter_mb"][1] == 1495.0
    assert rss_windows(leak[:2], 0)["floor_growth_mb"] is None
