"""`python -m bench`: load-test the XTTS worker, the seed's behaviour (baseline) beside batching, in ONE run.

    python -m bench [local]  [--size tiny|small|full] [--device cpu|cuda] [--concurrencies 1,4,16] [--jobs 16] ...
    python -m bench endpoint --endpoint-id ID [--base-url https://api.runpod.ai/v2] [--mode run|runsync] ...

`local` (the default) starts everything on 127.0.0.1: fake-gcs-server (behind a latency/fault proxy when asked),
a RunPod job service (bench.runpod_fake.FakeRunPod) and, for each configuration, one worker process (`python -m
server`, RunPod production mode, a demo checkpoint of the chosen size); it stops all of it at the end, on
Ctrl-C too. `endpoint` drives a deployed RunPod endpoint (API key from RUNPOD_API_KEY) or the SDK's local test
API (`python -m server --rp_serve_api`, give its URL as --base-url).

Results: bench/results/<name>.json, <name>.md and <name>.png (see bench/report.py). Run with --help for every
flag. Exit status: 0; 1 when a job failed without injected faults or a run could not complete; 2 on bad
arguments or an unusable setup (e.g. --device cuda without CUDA); 130 on Ctrl-C (partial report written).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
DEFAULT_REF_TEMPLATE = "gs://bench/voices/voice-{voice:03d}.wav"


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return values


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    from bench.workload import PROFILES

    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load benchmark of the XTTS worker: baseline (the seed's one-job-at-a-time behaviour) beside "
        "the batched worker, measured in one run, reported as JSON, Markdown and PNG in bench/results/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("target", nargs="?", default="local", choices=["local", "endpoint"],
                   help="local: start emulator, fake RunPod and worker processes here; endpoint: a RunPod "
                   "endpoint over HTTP")  # fmt: skip
    g = p.add_argument_group("workload (the same for every configuration)")
    g.add_argument("--concurrencies", type=_int_list, default="1,4,16",
                   help="closed-loop points: clients each keeping one job outstanding ('' for none)")
    g.add_argument("--rates", type=_float_list, default="",
                   help="open-loop points: Poisson arrival rates in jobs/s, e.g. 0.5,1 (default: none)")
    g.add_argument("--jobs", type=int, default=12,
                   help="jobs per load point (a closed-loop point gets at least its concurrency)")
    g.add_argument("--voices", type=int, default=8, help="distinct reference voices")
    g.add_argument("--zipf", type=float, default=1.1, help="voice popularity skew: P(k) ~ 1/k^s (0: uniform)")
    g.add_argument("--texts", default="short", choices=sorted(PROFILES),
                   help="text length profile: weights of short replies, sentences and paragraphs")
    g.add_argument("--max-chars", type=int, default=120, help="longest text (paragraphs are cut to it)")
    g.add_argument("--languages", default="pt:0.35,en:0.3,es:0.15,fr:0.08,de:0.07,it:0.05",
                   help="language mix LANG:WEIGHT,... (pt en es fr de it)")
    g.add_argument("--seed", type=int, default=0, help="workload seed: the same seed offers the same jobs")
    g.add_argument("--ref-seconds", type=float, default=6.0, help="length of each synthetic reference voice")
    g.add_argument("--warmup-jobs", type=int, default=2,
                   help="unmeasured jobs (on a voice outside the workload) before the first point of each run")
    g.add_argument("--job-timeout-s", type=float, default=300.0, help="a job without result after this fails")
    g.add_argument("--point-timeout-s", type=float, default=900.0,
                   help="bound of one load point: jobs not offered by then are counted as NOT_STARTED errors")

    g = p.add_argument_group("local target")
    g.add_argument("--size", default="tiny", choices=["tiny", "small", "full"], help="demo checkpoint size")
    g.add_argument("--model-dir", help="a checkpoint folder instead of a demo checkpoint")
    g.add_argument("--device", default="cpu", help="XTTS_DEVICE of the worker: cpu, cuda, cuda:N, auto")
    g.add_argument("--configs", default="baseline,batched",
                   help="configurations to run, in order: baseline (the seed: XTTS_ENGINE=stock, "
                   "MAX_CONCURRENCY=1, MAX_BATCH_SIZE=1, BATCH_WAIT_MS=0, LATENT_CACHE=off), unbatched (the "
                   "same settings on this worker's engine) and/or batched")  # fmt: skip
    g.add_argument("--order", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved: every configuration's worker up at once, each load point run on one "
                   "configuration after the other; sequential: one configuration (worker) after the other, "
                   "restarted in between (less memory, e.g. for a full model on a small GPU)")  # fmt: skip
    g.add_argument("--max-concurrency", type=int, default=32, help="batched: MAX_CONCURRENCY")
    g.add_argument("--max-batch-size", type=int, default=8, help="batched: MAX_BATCH_SIZE")
    g.add_argument("--batch-wait-ms", type=float, default=15.0, help="batched: BATCH_WAIT_MS")
    g.add_argument("--worker-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra worker variable for every configuration (repeatable), e.g. "
                   "XTTS_VOCODER_BATCHING=batched")  # fmt: skip
    g.add_argument("--gcs-latency-ms", type=float, default=0.0,
                   help="latency added to every GCS request by the fault proxy")
    g.add_argument("--compare-gcs-latency", type=float, metavar="MS",
                   help="run every configuration twice, without and with MS of added GCS latency, and report "
                   "the throughput ratio")  # fmt: skip
    g.add_argument("--gcs-fail", type=int, default=0,
                   help="fault injection: the first N GCS requests after warm-up get HTTP 503 (the worker retries)")
    g.add_argument("--gcs-resets", type=int, default=0,
                   help="fault injection: the next N GCS requests after warm-up get a connection reset")
    g.add_argument("--worker-start-timeout-s", type=float, default=900.0,
                   help="longest wait for a worker to load the model and serve its warm-up jobs")
    g.add_argument("--keep-work-dir", action="store_true",
                   help="keep the temporary folder (worker logs, caches); kept anyway when a run fails")

    g = p.add_argument_group("endpoint target")
    g.add_argument("--endpoint-id", help="RunPod endpoint id")
    g.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="API base; the local test API's URL (http://127.0.0.1:PORT) works too")
    g.add_argument("--baseline-endpoint-id",
                   help="a second endpoint, deployed with the baseline settings, to run the same workload on")
    g.add_argument("--mode", default="run", choices=["run", "runsync"],
                   help="run: POST /run then poll /status; runsync: POST /runsync (polls /status if unfinished)")
    g.add_argument("--api-layout", default="auto", choices=["auto", "runpod", "flat"],
                   help="runpod: {base}/{endpoint_id}/run; flat: {base}/run (the SDK's local test API); auto: "
                   "probe /{endpoint_id}/health, then /openapi.json")  # fmt: skip
    g.add_argument("--status-method", default="auto", choices=["auto", "get", "post"],
                   help="HTTP method of /status (auto: GET on RunPod, POST on the local test API)")
    g.add_argument("--poll-interval-s", type=float, default=0.5, help="/status polling interval")
    g.add_argument("--ref-url-template", default=DEFAULT_REF_TEMPLATE,
                   help="reference URL of voice N ({voice} is formatted); the local target serves these from "
                   "its emulator")  # fmt: skip
    g.add_argument("--local-storage-dir",
                   help="endpoint: write the synthetic voices to DIR/<bucket>/<object> of --ref-url-template "
                   "first (the worker's LOCAL_STORAGE_DIR)")  # fmt: skip
    g.add_argument("--metrics-url", help="endpoint: the worker's Prometheus URL, to scrape around each point")
    g.add_argument("--worker-pid", type=int, help="endpoint: the worker's pid, to sample its RSS")

    g = p.add_argument_group("soak (reliability)")
    g.add_argument("--soak-jobs", type=int, default=0,
                   help="after the load points, N more jobs in a closed loop while the worker's RSS is sampled")
    g.add_argument("--soak-concurrency", type=int, help="soak clients (default: the largest concurrency, or 16)")
    g.add_argument("--soak-config", default="batched",
                   help="local: the configuration that soaks (endpoint: always the --endpoint-id one)")
    g.add_argument("--soak-warmup-jobs", type=int,
                   help="RSS 'after warm-up' is taken when this many soak jobs are done (default max(10, N/10))")
    g.add_argument("--soak-timeout-s", type=float, default=7200.0, help="bound of the soak")
    g.add_argument("--rss-interval-s", type=float, default=1.0, help="worker RSS sampling interval")

    g = p.add_argument_group("report")
    g.add_argument("--name", help="report name (default: load-<size>-<device>, or endpoint-<id>)")
    g.add_argument("--out-dir", default=None, help="where the report goes (default bench/results)")
    g.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from bench.load import CONFIG_NAMES

    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if not args.concurrencies and not args.rates and not args.soak_jobs:
        parser.error("nothing to run: give --concurrencies, --rates or --soak-jobs")
    if args.target == "local":
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in CONFIG_NAMES]
        if bad or not configs:
            parser.error(f"--configs takes {', '.join(CONFIG_NAMES)}; got {args.configs!r}")
        args.config_list = configs
        for name in ("max_concurrency", "max_batch_size"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.gcs_latency_ms < 0 or (args.compare_gcs_latency is not None and args.compare_gcs_latency <= 0):
            parser.error("GCS latencies must be >= 0 (--compare-gcs-latency > 0)")
    else:
        if not args.endpoint_id:
            parser.error("the endpoint target needs --endpoint-id")
        for flag in ("compare_gcs_latency", "model_dir"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} applies to the local target only")
        if args.gcs_latency_ms or args.gcs_fail or args.gcs_resets:
            parser.error("GCS fault injection applies to the local target only")
    try:
        args.ref_url_template.format(voice=0)
        from bench.load import split_gs_url

        if args.target == "local":
            split_gs_url(args.ref_url_template.format(voice=0))
    except (KeyError, IndexError, ValueError) as exc:
        parser.error(f"--ref-url-template: {exc}")


# --------------------------------------------------------------------------------------------- the runs


class _RunStack:
    """What one local run (a configuration at one GCS latency) has to itself: a fault proxy (when used), a fake
    RunPod job service and one worker process. Only the GCS emulator is shared."""

    def __init__(self, run, opts, emulator_url: str, use_proxy: bool, to_input):
        self.run = run
        self.opts = opts
        self.emulator_url = emulator_url
        self.use_proxy = use_proxy
        self.to_input = to_input
        self.proxy = self.fake = self.worker = self.target = self.scraper = None

    async def start(self, bench: Bench) -> None:
        from bench.faultproxy import FaultProxy
        from bench.load import LocalWorker
        from bench.runpod_fake import FakeRunPod
        from bench.targets import LocalTarget, MetricsScraper

        a = bench.args
        t0 = time.monotonic()
        if self.use_proxy:
            self.proxy = await FaultProxy(self.emulator_url, latency_ms=self.run.gcs_latency_ms).start()
        self.fake = await FakeRunPod(poll_timeout_s=1.0, stop_poll_timeout_s=1.0).start()
        self.target = LocalTarget(self.fake, self.to_input)
        self.worker = LocalWorker(self.fake, self.opts, self.run, self.proxy.url if self.proxy else self.emulator_url)
        await self.worker.start(self.target.run_job, warm_voice=bench.spec.voices)
        if self.proxy is not None:  # faults hit the measured jobs, not the warm-up
            if a.gcs_fail:
                self.proxy.fail_next(a.gcs_fail, status=503)
            if a.gcs_resets:
                self.proxy.reset_next(a.gcs_resets)
        self.scraper = MetricsScraper(self.worker.metrics_url)
        self.run.wall_s += time.monotonic() - t0

    async def measure(self, bench: Bench, session, point) -> None:
        from bench.load import measure_points

        a = bench.args
        t0 = time.monotonic()
        await measure_points(self.run, [point], self.target.run_job, session=session, scraper=self.scraper,
                             sampler=self.worker.sampler, job_timeout_s=a.job_timeout_s,
                             point_timeout_s=a.point_timeout_s)  # fmt: skip
        self.run.wall_s += time.monotonic() - t0

    async def close(self) -> None:
        worker, fake, proxy = self.worker, self.fake, self.proxy
        self.worker = self.fake = self.proxy = None
        if worker is not None:
            await worker.stop()
        if fake is not None:
            await fake.close()
        if proxy is not None:
            await proxy.stop()
        if proxy is not None:
            self.run.worker["gcs_requests_through_proxy"] = sum(proxy.counts.values())


class Bench:
    """Holds what a run measured so far, so an interrupted run can still write a partial report."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        from bench.workload import WorkloadSpec, parse_language_mix

        self.args = args
        self.argv = argv
        self.started = time.monotonic()
        self.spec = WorkloadSpec(seed=args.seed, voices=args.voices, zipf_s=args.zipf, profile=args.texts,
                                 max_chars=args.max_chars, languages=parse_language_mix(args.languages))
        self.runs: list = []
        self.extra: dict[str, Any] = {}
        self.notes: list[str] = []
        self.date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    @property
    def faults_injected(self) -> bool:
        a = self.args
        return bool(a.target == "local" and (a.gcs_fail or a.gcs_resets))

    def soak_settings(self) -> tuple[int, int, int]:
        a = self.args
        concurrency = a.soak_concurrency or (max(a.concurrencies) if a.concurrencies else 16)
        warm = a.soak_warmup_jobs if a.soak_warmup_jobs is not None else max(10, a.soak_jobs // 10)
        return a.soak_jobs, concurrency, min(warm, max(1, a.soak_jobs))

    def report_name(self) -> str:
        a = self.args
        return a.name or (f"load-{a.size}-{a.device.replace(':', '')}" if a.target == "local"
                          else f"endpoint-{a.endpoint_id}")  # fmt: skip

    def to_input(self, job):
        return job.to_input(self.args.ref_url_template)

    # ------------------------------------------------------------------ local

    async def run_local(self) -> None:
        import aiohttp

        from bench.gcs_emulator import GcsEmulator
        from bench.load import (
            BASELINE_SETTINGS, UNBATCHED_SETTINGS, LocalOptions, RunRecord, batched_settings, check_device,
            checkpoint_dir, cleanup_workdir, new_workdir, plan_points, split_gs_url, voice_wav_bytes,
        )  # fmt: skip

        a = self.args
        await asyncio.to_thread(check_device, a.device)
        if a.model_dir:
            checkpoint = Path(a.model_dir).resolve()
        else:
            log.info("demo checkpoint %s (built on first use)...", a.size)
            checkpoint = await asyncio.to_thread(checkpoint_dir, a.size)
        demo = (checkpoint / "DEMO.json").is_file()
        self.extra["model"] = {
            "size": None if a.model_dir else a.size, "dir": str(checkpoint), "demo": demo,
            "description": f"demo {a.size} checkpoint (random weights)" if demo else f"checkpoint {checkpoint}",
        }  # fmt: skip
        points = plan_points(self.spec, a.jobs, a.concurrencies, a.rates)
        self.extra["points"] = points
        latencies = [a.gcs_latency_ms] + ([a.compare_gcs_latency] if a.compare_gcs_latency is not None else [])
        use_proxy = bool(a.gcs_latency_ms or a.compare_gcs_latency or a.gcs_fail or a.gcs_resets)
        self.extra["gcs"] = {"emulator": "fake-gcs-server (memory backend) on 127.0.0.1",
                             "fault_proxy": use_proxy, "latencies_ms": latencies, "fail_503": a.gcs_fail,
                             "resets": a.gcs_resets}  # fmt: skip
        batched = batched_settings(a.max_concurrency, a.max_batch_size, a.batch_wait_ms)
        settings = {"baseline": dict(BASELINE_SETTINGS), "unbatched": dict(UNBATCHED_SETTINGS), "batched": batched,
                    "static": {**batched, "SCHEDULING": "static"},
                    "continuous": {**batched, "SCHEDULING": "continuous"}}
        bucket, _ = split_gs_url(a.ref_url_template.format(voice=0))
        workdir = new_workdir()
        ok = interrupted = False
        emulator = None
        stacks: list[_RunStack] = []
        try:
            emulator = await asyncio.to_thread(GcsEmulator([bucket]).start)
            for voice in range(self.spec.voices + 1):  # the last one is the warm-up voice
                vb, name = split_gs_url(a.ref_url_template.format(voice=voice))
                if vb != bucket:
                    raise ValueError(f"--ref-url-template must name one bucket, got {vb!r} and {bucket!r}")
                await asyncio.to_thread(emulator.put_object, bucket, name, voice_wav_bytes(voice, a.ref_seconds),
                                        "audio/wav")  # fmt: skip
            opts = LocalOptions(checkpoint=checkpoint, device=a.device, bucket=bucket, workdir=workdir,
                                warmup_jobs=a.warmup_jobs,
                                worker_start_timeout_s=a.worker_start_timeout_s, worker_env=dict(a.worker_env),
                                rss_interval_s=a.rss_interval_s)  # fmt: skip
            for latency in latencies:
                for config in a.config_list:
                    name = config if latency == latencies[0] else f"{config}+gcs{latency:g}ms"
                    run = RunRecord(run=name, config=config, gcs_latency_ms=latency,
                                    settings={**settings[config], **dict(a.worker_env)})
                    self.runs.append(run)
                    stacks.append(_RunStack(run, opts, emulator.url, use_proxy, self.to_input))
            async with aiohttp.ClientSession(trust_env=False) as session:
                if a.order == "sequential":
                    # One worker at a time: started, every point, soak, stopped; then the next configuration.
                    for stack in stacks:
                        await stack.start(self)
                        for point in points:
                            await stack.measure(self, session, point)
                        await self._maybe_soak(stack, session, latencies[0])
                        await stack.close()
                else:
                    # Every worker started first (one after the other), then each load point on every
                    # configuration in turn: slow drifts of a shared machine's load hit both sides alike.
                    for stack in stacks:
                        await stack.start(self)
                    for point in points:
                        for stack in stacks:
                            await stack.measure(self, session, point)
                    for stack in stacks:
                        await self._maybe_soak(stack, session, latencies[0])
            ok = True
        except asyncio.CancelledError:
            interrupted = True
            raise
        finally:
            for stack in stacks:
                await stack.close()
            if emulator is not None:
                emulator.stop()
            # Kept for a look at the worker logs when a run failed; removed on success and on Ctrl-C.
            keep = a.keep_work_dir or not (ok or interrupted)
            cleanup_workdir(workdir, keep=keep)
            if keep:
                self.notes.append(f"worker logs and caches kept in {workdir}")

    async def _maybe_soak(self, stack: _RunStack, session, first_latency: float) -> None:
        from bench.load import soak

        a = self.args
        soak_jobs, soak_c, soak_warm = self.soak_settings()
        if not soak_jobs or stack.run.config != a.soak_config or stack.run.gcs_latency_ms != first_latency:
            return
        t0 = time.monotonic()
        await soak(stack.run, self.spec, soak_jobs, soak_c, soak_warm, stack.target.run_job, session=session,
                   scraper=stack.scraper, sampler=stack.worker.sampler, job_timeout_s=a.job_timeout_s,
                   timeout_s=a.soak_timeout_s)  # fmt: skip
        stack.run.wall_s += time.monotonic() - t0

    # ------------------------------------------------------------------ endpoint

    async def run_endpoint(self) -> None:
        import aiohttp

        from bench.load import (
            RunRecord, measure_points, plan_points, soak, split_gs_url, voice_wav_bytes, warmup_jobs,
        )  # fmt: skip
        from bench.targets import EndpointTarget, MetricsScraper, RssSampler

        a = self.args
        if a.local_storage_dir:
            root = Path(a.local_storage_dir)
            for voice in range(self.spec.voices + 1):
                bucket, name = split_gs_url(a.ref_url_template.format(voice=voice))
                path = root / bucket / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(voice_wav_bytes(voice, a.ref_seconds))
        points = plan_points(self.spec, a.jobs, a.concurrencies, a.rates)
        self.extra["points"] = points
        self.extra["model"] = {"description": "as deployed on the endpoint"}
        endpoints = ([("baseline", a.baseline_endpoint_id)] if a.baseline_endpoint_id else []) + [
            ("endpoint", a.endpoint_id)]
        soak_jobs, soak_c, soak_warm = self.soak_settings()
        api_key = os.environ.get("RUNPOD_API_KEY") or None
        async with aiohttp.ClientSession(trust_env=False) as session:
            for config, endpoint_id in endpoints:
                target = EndpointTarget(a.base_url, endpoint_id, self.to_input, api_key=api_key, mode=a.mode,
                                        layout=a.api_layout, status_method=a.status_method,
                                        poll_interval_s=a.poll_interval_s)  # fmt: skip
                await target.start()
                run = RunRecord(run=config, config=config)
                self.runs.append(run)
                main = endpoint_id == a.endpoint_id
                sampler = RssSampler(a.worker_pid if main else None, a.rss_interval_s).start()
                scraper = MetricsScraper(a.metrics_url if main else None)
                t0 = time.monotonic()
                try:
                    self.extra.setdefault("endpoint", target.describe())
                    run.worker["endpoint"] = target.describe()
                    warm = [await target.run_job(j, a.job_timeout_s)
                            for j in warmup_jobs(a.warmup_jobs, self.spec.voices)]  # fmt: skip
                    run.worker["warmup_jobs"] = len(warm)
                    run.worker["warmup_ok"] = sum(r.ok for r in warm)
                    rss = sampler.sample()
                    run.worker["rss_after_warmup_mb"] = round(rss / 1024**2, 1) if rss else None
                    common = dict(session=session, scraper=scraper, sampler=sampler, job_timeout_s=a.job_timeout_s)
                    await measure_points(run, points, target.run_job, point_timeout_s=a.point_timeout_s, **common)
                    if soak_jobs and main:
                        await soak(run, self.spec, soak_jobs, soak_c, soak_warm, target.run_job,
                                   timeout_s=a.soak_timeout_s, **common)  # fmt: skip
                finally:
                    await sampler.stop()
                    peak = sampler.peak()
                    run.worker["peak_rss_mb"] = round(peak / 1024**2, 1) if peak else None
                    run.wall_s = time.monotonic() - t0
                    await target.close()

    # ------------------------------------------------------------------ report

    def report(self, interrupted: bool = False) -> dict[str, Any]:
        from bench.load import compare_points
        from bench.report import git_info, machine_info
        from bench.workload import describe

        a = self.args
        machine = machine_info()
        with contextlib.suppress(OSError):
            machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        machine["load_average_at_start"] = self.extra.get("load_at_start", machine.get("load_average_at_start"))
        runs = [r.as_dict() for r in self.runs]
        points = self.extra.get("points", [])
        ratios, gcs = [], []
        for run in runs:
            # Every run against the baseline (the seed); batched also against unbatched (what batching and the
            # caches buy on this worker's own engine).
            denominators = {"batched": ("baseline", "unbatched"), "continuous": ("baseline", "static")}
            for denominator in denominators.get(run["config"], ("baseline",)):
                base = next((r for r in runs if r["config"] == denominator
                             and r["gcs_latency_ms"] == run["gcs_latency_ms"]), None)  # fmt: skip
                if base is not None and run is not base:
                    ratios.append(compare_points(run, base))
            if run["gcs_latency_ms"] and a.target == "local" and a.compare_gcs_latency is not None:
                ref = next((r for r in runs if r["config"] == run["config"]
                            and r["gcs_latency_ms"] == a.gcs_latency_ms), None)  # fmt: skip
                if ref is not None:
                    gcs.append(compare_points(run, ref))
        notes = list(self.notes) + self._notes(runs)
        errors = sum(p["errors"] for r in runs for p in r["points"] + ([r["soak"]] if r["soak"] else []))
        name = self.report_name()
        report = {
            "name": name,
            "date": self.date,
            "duration_s": round(time.monotonic() - self.started, 1),
            "interrupted": interrupted,
            "command": ("python -m bench " + shlex.join(self.argv)).strip(),
            "target": a.target,
            "machine": machine,
            "git": git_info(Path(__file__).resolve().parents[1]),
            "model": self.extra.get("model", {}),
            "device": a.device if a.target == "local" else "as deployed",
            "workload": {**self.spec.as_dict(), "jobs_per_point": a.jobs, "concurrencies": a.concurrencies,
                         "rates": a.rates, "ref_seconds": a.ref_seconds, "warmup_jobs": a.warmup_jobs,
                         "offered": describe([j for p in points for j in p.jobs])},  # fmt: skip
            "configs": {r["run"]: r["settings"] for r in runs},
            "order": a.order if a.target == "local" else "sequential",
            "gcs": self.extra.get("gcs"),
            "endpoint": self.extra.get("endpoint"),
            "faults_injected": self.faults_injected,
            "errors_total": errors,
            "ratios": ratios,
            "gcs_latency_comparison": gcs,
            "runs": runs,
            "notes": notes,
        }
        return report

    def _notes(self, runs: list[dict]) -> list[str]:
        a = self.args
        notes = []
        if a.target == "local":
            configs = {r["config"] for r in runs}
            if len(configs) > 1:
                notes.append(
                    "Order: " + ("interleaved — every configuration's worker was up for the whole run, and each "
                                 "load point ran on one configuration right after the other, so slow changes in the "
                                 "machine's background load hit them alike."
                                 if a.order == "interleaved" else
                                 "sequential — one worker per configuration, stopped before the next one started."))
            if configs & {"baseline", "unbatched"}:
                notes.append(
                    "Baseline = the seed's behaviour as worker settings: XTTS_ENGINE=stock (each row decoded as "
                    "stock Xtts.inference does: Hugging Face generate, a second full GPT pass for the vocoder "
                    "latents, HiFi-GAN with its weight norm), MAX_CONCURRENCY=1, MAX_BATCH_SIZE=1, BATCH_WAIT_MS=0 "
                    "and LATENT_CACHE=off (speaker latents recomputed for every job). LATENT_CACHE_SIZE=1 and "
                    "LATENT_CACHE_DIR='' are set too: the emulation used before the worker had the LATENT_CACHE "
                    "switch (harmless beside it). The reference-audio disk cache stays on, as in the seed. "
                    "Unbatched (when run) = the same settings on this worker's own engine (XTTS_ENGINE=batched): "
                    "batched/unbatched is what batching and the caches buy, batched/baseline what the whole worker "
                    "buys over the seed.")
                notes.append(
                    "The MAX_CONCURRENCY=1 of baseline and unbatched includes the RunPod SDK's own pause: with every "
                    "slot busy, JobScaler sleeps 1 s before asking for the next job (runpod 1.12). The seed ran "
                    "with the SDK's default concurrency of 1 and paid the same.")
            engines = {}
            for r in runs:
                reported = [(p.get("worker_metrics") or {}).get("engine") for p in r["points"]]
                engines[r["run"]] = next((e for e in reported if e), None)
            if any(engines.values()):
                notes.append("Engines, as each worker's xtts_engine_info reported them: " + ", ".join(
                    f"{run} = {e['engine']} (vocoder {e['vocoder']}, {e['device']})" if e else f"{run} = not reported"
                    for run, e in engines.items()) + ".")  # fmt: skip
            shares = []
            for r in runs:
                for p in r["points"]:
                    vocoder = ((p.get("worker_metrics") or {}).get("stages") or {}).get("vocoder")
                    if vocoder and p.get("wall_s"):
                        shares.append(f"{r['run']} {p['label']} {vocoder['sum_s']:.1f} s of {p['wall_s']:.1f} s "
                                      f"({vocoder['sum_s'] / p['wall_s']:.0%})")  # fmt: skip
            if shares:
                notes.append("Vocoder (HiFi-GAN) time, from the worker's xtts_stage_duration_seconds{stage=\"vocoder\"}, "
                             "against the point's wall time: " + "; ".join(shares) + ".")  # fmt: skip
            for run in runs:
                if run["config"] not in ("baseline", "unbatched"):
                    continue
                hits = sum(((p.get("worker_metrics") or {}).get("caches", {}).get("latents") or {}).get("hits", 0)
                           for p in run["points"])  # fmt: skip
                misses = sum(((p.get("worker_metrics") or {}).get("caches", {}).get("latents") or {}).get("misses", 0)
                             for p in run["points"])  # fmt: skip
                notes.append(f"Checked in {run['run']}: {hits} latent-cache hits and {misses} misses "
                             f"(computed conditionings) in the measured points"
                             + ("." if hits == 0 else " — NOT the seed's behaviour: the worker reused latents."))
            if (self.extra.get("model") or {}).get("demo"):
                notes.append(
                    "Demo checkpoint: the released architecture with random weights (it speaks noise); each segment "
                    "is ended after 1.4 audio tokens per character, so audio length follows text length.")
            if a.device == "cpu":
                notes.append(
                    "CPU: the HiFi-GAN vocoder runs per row (XTTS_VOCODER_BATCHING=auto), at roughly 0.7 s per "
                    "audio second here, and does not batch; GPT decoding and conditioning are what batching and "
                    "the latent cache save. The load generator, emulator and fake RunPod share the machine "
                    "with the worker.")
            gpu_seen = any((p.get("worker_metrics") or {}).get("gpu_memory_bytes") for r in runs for p in r["points"])
            notes.append(
                "GPU memory comes from the worker's xtts_gpu_memory_bytes gauge, which the worker sets once after "
                "loading the model (not a peak under load)" + ("." if gpu_seen else "; none reported on this device."))
        else:
            notes.append("Endpoint target: latency is measured by this client, through /status polling every "
                         f"{a.poll_interval_s:g} s ({a.mode}); worker metrics and RSS only when --metrics-url / "
                         "--worker-pid are given.")
        if self.faults_injected:
            notes.append("Faults were injected (--gcs-fail/--gcs-resets): errors may be expected.")
        return notes


async def _amain(bench: Bench) -> int:
    from bench.load import BenchError
    from bench.report import RESULTS, write_report
    from bench.targets import EndpointError

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(OSError):
        bench.extra["load_at_start"] = [round(x, 2) for x in os.getloadavg()]
    a = bench.args
    out_dir = Path(a.out_dir) if a.out_dir else RESULTS
    status = 0
    try:
        if a.target == "local":
            await bench.run_local()
        else:
            await bench.run_endpoint()
    except asyncio.CancelledError:
        if any(r.points for r in bench.runs):
            paths = write_report(bench.report(interrupted=True), out_dir, bench.report_name())
            print(f"interrupted; partial report: {paths['json']}", file=sys.stderr)
        raise
    except (BenchError, EndpointError) as exc:
        log.error("%s", exc)
        if not any(r.points for r in bench.runs):
            return 2
        status = 1
    report = bench.report()
    paths = write_report(report, out_dir, report["name"])
    from bench.report import markdown

    print(markdown(report))
    for kind, path in paths.items():
        print(f"written {kind}: {path}")
    if report["errors_total"] and not report["faults_injected"]:
        log.error("%d job(s) failed without injected faults", report["errors_total"])
        status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    try:
        bench = Bench(args, argv)
    except ValueError as exc:
        parser.error(str(exc))
    # Ctrl-C must stop the run even when a parent shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(_amain(bench))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print("terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
