"""The load run: configurations, load points, the local stack, and the numbers each point yields.

    local target:   fake-gcs-server [-> FaultProxy] <- worker (`python -m server`, RunPod production loop)
                    -> FakeRunPod job service <- this load generator
    endpoint:       this load generator -> RunPod endpoint (/run + /status, or /runsync)

For the local target each configuration (baseline, unbatched, batched) gets ONE fresh worker process, with empty
caches, that serves every load point of that configuration in turn (closed-loop concurrencies, then open-loop
rates, then the soak). Every configuration is offered exactly the same jobs (bench.workload, one seeded stream
per load point).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.runpod_fake import FakeRunPod, WorkerProcess
from bench.stats import Snapshot, counter_delta, hit_rate, histogram_delta, rate, ratio, summarize
from bench.targets import NOT_STARTED, JobRecord, MetricsScraper, RssSampler, new_record
from bench.workload import REPLIES, JobSpec, WorkloadSpec, make_jobs, poisson_arrivals

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

# The seed's behaviour, as worker settings: one job at a time, one row per batch, no waiting for company, speaker
# latents recomputed for every job, and each row decoded as stock `Xtts.inference` decodes it (XTTS_ENGINE=stock:
# HF generate, a second GPT pass, HiFi-GAN with weight norm). LATENT_CACHE=off is the worker's switch for the
# latents; LATENT_CACHE_SIZE=1 and LATENT_CACHE_DIR='' are the emulation used before that switch existed.
UNBATCHED_SETTINGS: dict[str, str] = {
    "MAX_CONCURRENCY": "1",
    "MAX_BATCH_SIZE": "1",
    "BATCH_WAIT_MS": "0",
    "LATENT_CACHE": "off",
    "LATENT_CACHE_SIZE": "1",
    "LATENT_CACHE_DIR": "",
}
BASELINE_SETTINGS: dict[str, str] = {**UNBATCHED_SETTINGS, "XTTS_ENGINE": "stock"}
# baseline: the seed (stock path + seed settings); unbatched: this worker's engine with the seed's settings (what
# the engine alone buys, without batching or caches); batched: the worker as deployed.
# static / continuous: the worker as deployed with SCHEDULING=static (whole batches run to completion) or
# SCHEDULING=continuous (the default: rows join and leave at every decoding step), to compare the two in one run.
CONFIG_NAMES = ("baseline", "unbatched", "batched", "static", "continuous")
SHORT_JOB_CHARS = 60  # "short jobs" in reports: replies a user waits on

# Variables the worker reads (server/config.py, storage/config.py) or the SDK reacts to: never inherited from
# the shell that runs the bench, so a stray export cannot change what is measured (or reach a real bucket).
_WORKER_VARIABLE_PREFIXES = (
    "RUNPOD_", "GCS_", "STORAGE_", "XTTS_", "LATENT_CACHE", "AUDIO_CACHE", "MAX_", "ALLOWED_", "ALLOW_LOOPBACK",
    "SIGNED_URL", "LOCAL_STORAGE_DIR", "GOOGLE_APPLICATION_CREDENTIALS", "BATCH_WAIT_MS", "METRICS_PORT",
    "JOB_TIMEOUT_S", "DEFAULT_LANGUAGE", "DEFAULT_OUTPUT_FORMAT", "LOG_LEVEL", "SCHEDULING",
)  # fmt: skip


def batched_settings(max_concurrency: int = 32, max_batch_size: int = 8, batch_wait_ms: float = 15) -> dict:
    return {
        "MAX_CONCURRENCY": str(max_concurrency),
        "MAX_BATCH_SIZE": str(max_batch_size),
        "BATCH_WAIT_MS": f"{batch_wait_ms:g}",
        "LATENT_CACHE": "on",
    }


class BenchError(RuntimeError):
    """A run that cannot go on: the message says why (worker log tail included where there is one)."""


# ------------------------------------------------------------------------------------------- load points


@dataclass
class PointPlan:
    mode: str  # "closed" | "open" | "soak"
    jobs: list[JobSpec]
    concurrency: int | None = None
    rate: float | None = None  # jobs/s, open loop
    arrivals: list[float] | None = None

    @property
    def label(self) -> str:
        if self.mode == "open":
            return f"open@{self.rate:g}/s"
        return f"{self.mode}@c{self.concurrency}"


def plan_points(spec: WorkloadSpec, jobs_per_point: int, concurrencies: Sequence[int],
                rates: Sequence[float]) -> list[PointPlan]:  # fmt: skip
    """The load points of a run, each with its own seeded job stream (the same for every configuration).

    A closed-loop point gets at least `concurrency` jobs: with fewer, its clients could never all be busy."""
    points = [PointPlan("closed", make_jobs(spec, max(jobs_per_point, c), f"closed-c{c}"), concurrency=c)
              for c in concurrencies]  # fmt: skip
    for r in rates:
        points.append(PointPlan("open", make_jobs(spec, jobs_per_point, f"open-r{r:g}"), rate=r,
                                arrivals=poisson_arrivals(jobs_per_point, r, spec.seed, f"arrivals-r{r:g}")))
    return points


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


# ---------------------------------------------------------------------------------------- point summary


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
            # The same jobs must give the same audio (demo lengths follow the text): a check that both sides
            # were offered, and completed, the same work.
            "same_audio": bool(p.get("audio_s") and q.get("audio_s")
                               and abs(p["audio_s"] - q["audio_s"]) <= 0.01 * q["audio_s"]),
        })  # fmt: skip
    return {"numerator": numerator["run"], "denominator": denominator["run"], "points": out}


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


# ----------------------------------------------------------------------------------------- local stack


def voice_wav_bytes(voice: int, seconds: float) -> bytes:
    """A distinct synthetic reference voice as 16-bit WAV at 22.05 kHz (pitch and noise differ per voice)."""
    import soundfile as sf

    from bench.voices import synthetic_voice

    buffer = io.BytesIO()
    wav = synthetic_voice(seconds, f0=90.0 + (voice * 37) % 160, seed=voice)
    sf.write(buffer, wav, 22050, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def split_gs_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "gs" or not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"want gs://bucket/object, got {url!r}")
    return parts.netloc, parts.path.lstrip("/")


def warmup_jobs(count: int, warm_voice: int) -> list[JobSpec]:
    """Short jobs on a voice outside the workload, so they warm the worker without touching its caches' counts
    for the measured voices."""
    texts = [(REPLIES["pt"][1], "pt"), (REPLIES["en"][1], "en")]
    return [JobSpec(10_000 + i, *texts[i % 2], warm_voice, "reply", 1000 + i) for i in range(count)]


def checkpoint_dir(size: str) -> Path:
    """The demo checkpoint of `size`, built on first use (in a subprocess: this process never imports torch)."""
    code = "from bench.voices import demo_checkpoint; import sys; print(demo_checkpoint(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, size], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"building the {size} demo checkpoint failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def check_device(device: str) -> None:
    """Fail fast, and clearly, when a CUDA device is asked for on a machine without one."""
    if not device.startswith("cuda"):
        return
    code = ("import sys, torch\n"
            "ok = torch.cuda.is_available()\n"
            "print(torch.cuda.get_device_name(0) if ok else f'torch {torch.__version__}, cuda '"
            " + str(torch.version.cuda) + ', devices: 0')\n"
            "sys.exit(0 if ok else 3)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"--device {device}: CUDA is not available on this machine "
                         f"(torch.cuda.is_available() is False; {done.stdout.strip() or done.stderr[-500:]}). "
                         "Run on a GPU machine, or use --device cpu.")  # fmt: skip


def worker_base_env(extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(_WORKER_VARIABLE_PREFIXES)}
    return {**base, **extra}


@dataclass
class LocalOptions:
    checkpoint: Path
    device: str
    bucket: str
    workdir: Path
    warmup_jobs: int
    worker_start_timeout_s: float
    worker_env: dict[str, str]
    rss_interval_s: float


class LocalWorker:
    """One worker process for one configuration: start, wait until it has served the warm-up jobs, stop."""

    def __init__(self, fake: FakeRunPod, opts: LocalOptions, run: RunRecord, gcs_url: str):
        self.fake = fake
        self.opts = opts
        self.run = run
        tag = run.run.replace("+", "-")
        self.metrics_port = _free_port()
        env = {
            **fake.env(),
            "PYTHONUNBUFFERED": "1",
            "XTTS_MODEL_DIR": str(opts.checkpoint),
            "XTTS_DEVICE": opts.device,
            "STORAGE_BACKEND": "gcs",
            "GCS_BUCKET_NAME": opts.bucket,
            "STORAGE_EMULATOR_HOST": gcs_url,
            "AUDIO_CACHE_DIR": str(opts.workdir / f"audio-cache-{tag}"),
            "LATENT_CACHE_DIR": str(opts.workdir / f"latent-cache-{tag}"),
            "METRICS_PORT": str(self.metrics_port),
            "LOG_LEVEL": "INFO",
            **run.settings,
            **opts.worker_env,
        }
        self.env = worker_base_env(env)
        self.log_path = opts.workdir / f"worker-{tag}.log"
        self.process = WorkerProcess([sys.executable, "-m", "server"], self.env, self.log_path, cwd=str(REPO))
        self.sampler = RssSampler(None, opts.rss_interval_s)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, chars: int = 4000) -> str:
        return self.process.log_text()[-chars:]

    async def start(self, run_job: RunJob, warm_voice: int) -> None:
        t0 = time.monotonic()
        await self.process.start()
        proc = self.process.process
        assert proc is not None
        self.sampler = RssSampler(proc.pid, self.opts.rss_interval_s).start()
        log.info("[%s] worker pid %d starting (log %s)", self.run.run, proc.pid, self.log_path)

        async def warm() -> list[JobRecord]:
            out = []
            for job in warmup_jobs(max(1, self.opts.warmup_jobs), warm_voice):  # one at a time
                out.append(await run_job(job, self.opts.worker_start_timeout_s))
                if not out[-1].ok:
                    break
            return out

        warm_task = asyncio.ensure_future(warm())
        exit_task = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([warm_task, exit_task], timeout=self.opts.worker_start_timeout_s + 5,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            if not warm_task.done():
                warm_task.cancel()
            exit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await warm_task
        if proc.returncode is not None:
            raise BenchError(f"[{self.run.run}] the worker exited with status {proc.returncode} while starting; "
                             f"its log ({self.log_path}) ends:\n{self.log_tail()}")  # fmt: skip
        records = warm_task.result() if warm_task.done() and not warm_task.cancelled() else []
        if not records or not all(r.ok for r in records):
            why = records[-1].error if records else "no warm-up job finished"
            raise BenchError(f"[{self.run.run}] the worker did not serve its warm-up jobs within "
                             f"{self.opts.worker_start_timeout_s:g} s ({why}); its log ends:\n{self.log_tail()}")
        self.run.worker.update({
            "pid": proc.pid,
            "start_s": round(time.monotonic() - t0, 2),
            "warmup_jobs": len(records),
            "rss_after_warmup_mb": round((self.sampler.sample() or 0) / MB, 1) or None,
            "metrics_url": self.metrics_url,
        })  # fmt: skip
        log.info("[%s] worker ready in %.1f s (imports, model load, warm-up, %d warm-up job(s))", self.run.run,
                 self.run.worker["start_s"], len(records))  # fmt: skip

    async def stop(self) -> None:
        await self.sampler.stop()
        if self.process.process is None:
            return
        peak = self.sampler.peak()
        status = await self.process.stop(timeout_s=30)
        self.run.worker.update({"exit_status": status, "peak_rss_mb": round(peak / MB, 1) if peak else None})


def _free_port() -> int:
    from bench.gcs_emulator import free_port

    return free_port()


def cleanup_workdir(workdir: Path, keep: bool) -> None:
    if keep:
        log.info("work folder kept: %s", workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="xtts-bench-"))

