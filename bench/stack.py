"""The local stack of a load run, all on 127.0.0.1: fake-gcs-server (shared), and per run (a configuration at one GCS
latency) a fault proxy when asked, a fake RunPod job service and one worker process (`python -m server` in RunPod's
production mode) started with empty caches, warmed up, measured and stopped.

    fake-gcs-server [-> FaultProxy] <- worker <- FakeRunPod <- the load generator (bench.targets.LocalTarget)

A run in HTTP mode (SERVER_MODE=http) has no fake RunPod: the load generator sends OpenAI speech requests to the
worker's own port (bench.targets.HttpTarget). The test doubles come from the `testing` package; the worker never sees a variable of the shell that runs the
bench (`worker_base_env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.load import RunJob, RunRecord, measure_points
from bench.summary import MB
from bench.targets import HttpTarget, JobRecord, LocalTarget, MetricsScraper, RssSampler
from bench.workload import JobSpec, PointPlan, warmup_jobs
from testing.faultproxy import FaultProxy
from testing.loopback import free_port
from testing.runpod_fake import FakeRunPod, WorkerProcess
from testing.voices import synthetic_voice_wav

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]

# Variables the worker reads (server/config.py, storage/config.py) or the SDK reacts to: never inherited from
# the shell that runs the bench, so a stray export cannot change what is measured (or reach a real bucket).
_WORKER_VARIABLE_PREFIXES = (
    "RUNPOD_", "GCS_", "STORAGE_", "XTTS_", "LATENT_CACHE", "AUDIO_CACHE", "MAX_", "ALLOWED_", "ALLOW_LOOPBACK",
    "SIGNED_URL", "LOCAL_STORAGE_DIR", "GOOGLE_APPLICATION_CREDENTIALS", "BATCH_WAIT_MS", "METRICS_PORT",
    "JOB_TIMEOUT_S", "DEFAULT_LANGUAGE", "DEFAULT_OUTPUT_FORMAT", "LOG_LEVEL", "SCHEDULING", "STREAM",
    "VOCODER_SPAN", "SERVER_MODE", "PORT_HEALTH", "API_KEY", "VOICE_REF_URL_TEMPLATE",
)  # fmt: skip
_WORKER_VARIABLES = frozenset({"PORT", "HOST"})


class BenchError(RuntimeError):
    """A run that cannot go on: the message says why (worker log tail included where there is one)."""


def voice_wav_bytes(voice: int, seconds: float) -> bytes:
    """A distinct synthetic reference voice as 16-bit WAV at 22.05 kHz (pitch and noise differ per voice)."""
    return synthetic_voice_wav(seconds, sr=22050, f0=90.0 + (voice * 37) % 160, seed=voice)


def checkpoint_dir(size: str) -> Path:
    """The demo checkpoint of `size`, built on first use (in a subprocess: this process never imports torch)."""
    code = "from testing.voices import demo_checkpoint; import sys; print(demo_checkpoint(sys.argv[1]))"
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
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(_WORKER_VARIABLE_PREFIXES) and k not in _WORKER_VARIABLES}  # fmt: skip
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
    """One worker process for one configuration: start, wait until it has served the warm-up jobs, stop.
    `serving`: how jobs reach it (the fake RunPod's variables in queue mode, PORT and HOST in HTTP mode)."""

    def __init__(self, serving: dict[str, str], opts: LocalOptions, run: RunRecord, gcs_url: str):
        self.opts = opts
        self.run = run
        tag = run.run.replace("+", "-")
        self.metrics_port = free_port()
        env = {
            **serving,
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

    async def start(self, run_job: RunJob, warm_voice: int, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start the process and serve the warm-up jobs, after `ready()` (HTTP mode: /ping 200) when given."""
        t0 = time.monotonic()
        await self.process.start()
        proc = self.process.process
        assert proc is not None
        self.sampler = RssSampler(proc.pid, self.opts.rss_interval_s).start()
        log.info("[%s] worker pid %d starting (log %s)", self.run.run, proc.pid, self.log_path)

        async def warm() -> list[JobRecord]:
            if ready is not None:
                await ready()
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


class RunStack:
    """What one local run (a configuration at one GCS latency) has to itself: a fault proxy (when used), a fake
    RunPod job service and one worker process. Only the GCS emulator is shared. `gcs_fail` / `gcs_resets`: faults
    the proxy injects into the measured jobs (after the warm-up)."""

    def __init__(self, run: RunRecord, opts: LocalOptions, emulator_url: str, use_proxy: bool,
                 to_input: Callable[[JobSpec], dict], *, warm_voice: int, gcs_fail: int = 0,
                 gcs_resets: int = 0) -> None:  # fmt: skip
        self.run = run
        self.opts = opts
        self.emulator_url = emulator_url
        self.use_proxy = use_proxy
        self.to_input = to_input
        self.warm_voice = warm_voice
        self.gcs_fail = gcs_fail
        self.gcs_resets = gcs_resets
        self.proxy: FaultProxy | None = None
        self.fake: FakeRunPod | None = None
        self.worker: LocalWorker | None = None
        self.target: LocalTarget | HttpTarget | None = None
        self.scraper: MetricsScraper | None = None

    async def start(self) -> None:
        t0 = time.monotonic()
        if self.use_proxy:
            self.proxy = await FaultProxy(self.emulator_url, latency_ms=self.run.gcs_latency_ms).start()
        gcs_url = self.proxy.url if self.proxy else self.emulator_url
        if self.run.settings.get("SERVER_MODE") == "http":  # OpenAI speech requests straight to the worker
            port = free_port()
            self.target = await HttpTarget(f"http://127.0.0.1:{port}", self.to_input).start()
            self.worker = LocalWorker({"PORT": str(port), "HOST": "127.0.0.1"}, self.opts, self.run, gcs_url)
            ready = self.target.wait_ready
        else:
            self.fake = await FakeRunPod(poll_timeout_s=1.0, stop_poll_timeout_s=1.0).start()
            self.target = LocalTarget(self.fake, self.to_input)
            self.worker = LocalWorker(self.fake.env(), self.opts, self.run, gcs_url)
            ready = None
        await self.worker.start(self.target.run_job, warm_voice=self.warm_voice, ready=ready)
        if self.proxy is not None:  # faults hit the measured jobs, not the warm-up
            if self.gcs_fail:
                self.proxy.fail_next(self.gcs_fail, status=503)
            if self.gcs_resets:
                self.proxy.reset_next(self.gcs_resets)
        self.scraper = MetricsScraper(self.worker.metrics_url)
        self.run.wall_s += time.monotonic() - t0

    async def measure(self, session: aiohttp.ClientSession, point: PointPlan, *, job_timeout_s: float,
                      point_timeout_s: float) -> None:  # fmt: skip
        t0 = time.monotonic()
        await measure_points(self.run, [point], self.target.run_job, session=session, scraper=self.scraper,
                             sampler=self.worker.sampler, job_timeout_s=job_timeout_s,
                             point_timeout_s=point_timeout_s)  # fmt: skip
        self.run.wall_s += time.monotonic() - t0

    async def close(self) -> None:
        worker, fake, proxy, target = self.worker, self.fake, self.proxy, self.target
        self.worker = self.fake = self.proxy = None
        if worker is not None:
            await worker.stop()
        if isinstance(target, HttpTarget):
            await target.close()
        if fake is not None:
            await fake.close()
        if proxy is not None:
            await proxy.stop()
        if proxy is not None:
            self.run.worker["gcs_requests_through_proxy"] = sum(proxy.counts.values())


def cleanup_workdir(workdir: Path, keep: bool) -> None:
    if keep:
        log.info("work folder kept: %s", workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="xtts-bench-"))
