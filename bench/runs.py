"""A load run of `python -m bench`, from parsed arguments to the report's content: on the local stack (each
configuration on a worker of its own, interleaved or one after the other) or against an endpoint. What it has
measured so far is kept, so an interrupted run can still write a partial report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.cli import is_local
from bench.configs import config_settings
from bench.load import RunRecord, measure_points, soak
from bench.notes import report_notes
from bench.report import git_info, machine_info
from bench.stack import (
    LocalOptions, RunStack, check_device, checkpoint_dir, cleanup_workdir, new_workdir, voice_wav_bytes,
)  # fmt: skip
from bench.summary import compare_points
from bench.targets import EndpointTarget, HttpTarget, MetricsScraper, RssSampler
from bench.workload import WorkloadSpec, describe, parse_language_mix, plan_points, split_gs_url, warmup_jobs
from testing.gcs_emulator import GcsEmulator

log = logging.getLogger("bench")


class Bench:
    """Holds what a run measured so far, so an interrupted run can still write a partial report."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
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
    def local(self) -> bool:
        """Runs on the local stack (`local`, and `http` without --http-url)."""
        return is_local(self.args)

    @property
    def faults_injected(self) -> bool:
        a = self.args
        return bool(self.local and (a.gcs_fail or a.gcs_resets))

    def soak_settings(self) -> tuple[int, int, int]:
        a = self.args
        concurrency = a.soak_concurrency or (max(a.concurrencies) if a.concurrencies else 16)
        warm = a.soak_warmup_jobs if a.soak_warmup_jobs is not None else max(10, a.soak_jobs // 10)
        return a.soak_jobs, concurrency, min(warm, max(1, a.soak_jobs))

    def report_name(self) -> str:
        a = self.args
        if a.name:
            return a.name
        if a.target == "endpoint":
            return f"endpoint-{a.endpoint_id}"
        if a.target == "http" and a.http_url:
            return "http-endpoint"
        return f"{'http' if a.target == 'http' else 'load'}-{a.size}-{a.device.replace(':', '')}"

    def to_input(self, job):
        return job.to_input(self.args.ref_url_template)

    # ------------------------------------------------------------------ local

    async def run_local(self) -> None:
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
        settings = config_settings(a.max_concurrency, a.max_batch_size, a.batch_wait_ms)
        bucket, _ = split_gs_url(a.ref_url_template.format(voice=0))
        workdir = new_workdir()
        ok = interrupted = False
        emulator = None
        stacks: list[RunStack] = []
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
                    stacks.append(RunStack(run, opts, emulator.url, use_proxy, self.to_input,
                                           warm_voice=self.spec.voices, gcs_fail=a.gcs_fail,
                                           gcs_resets=a.gcs_resets))  # fmt: skip
            timeouts = dict(job_timeout_s=a.job_timeout_s, point_timeout_s=a.point_timeout_s)
            async with aiohttp.ClientSession(trust_env=False) as session:
                if a.order == "sequential":
                    # One worker at a time: started, every point, soak, stopped; then the next configuration.
                    for stack in stacks:
                        await stack.start()
                        for point in points:
                            await stack.measure(session, point, **timeouts)
                        await self._maybe_soak(stack, session, latencies[0])
                        await stack.close()
                else:
                    # Every worker started first (one after the other), then each load point on every
                    # configuration in turn: slow drifts of a shared machine's load hit both sides alike.
                    for stack in stacks:
                        await stack.start()
                    for point in points:
                        for stack in stacks:
                            await stack.measure(session, point, **timeouts)
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

    async def _maybe_soak(self, stack: RunStack, session: aiohttp.ClientSession, first_latency: float) -> None:
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
        if a.target == "http":  # one HTTP-mode worker or load-balancing endpoint
            endpoints = [("http", a.http_url)]
        else:
            endpoints = ([("baseline", a.baseline_endpoint_id)] if a.baseline_endpoint_id else []) + [
                ("endpoint", a.endpoint_id)]
        soak_jobs, soak_c, soak_warm = self.soak_settings()
        api_key = os.environ.get("RUNPOD_API_KEY") or None
        async with aiohttp.ClientSession(trust_env=False) as session:
            for config, endpoint_id in endpoints:
                if a.target == "http":
                    target = HttpTarget(endpoint_id, self.to_input, api_key=api_key)
                else:
                    target = EndpointTarget(a.base_url, endpoint_id, self.to_input, api_key=api_key, mode=a.mode,
                                            layout=a.api_layout, status_method=a.status_method,
                                            poll_interval_s=a.poll_interval_s, stream=a.stream)  # fmt: skip
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
            denominators = {"batched": ("baseline", "unbatched"), "continuous": ("baseline", "static"),
                            "streaming": ("baseline", "continuous"), "http": ("baseline", "streaming")}
            for denominator in denominators.get(run["config"], ("baseline",)):
                base = next((r for r in runs if r["config"] == denominator
                             and r["gcs_latency_ms"] == run["gcs_latency_ms"]), None)  # fmt: skip
                if base is not None and run is not base:
                    ratios.append(compare_points(run, base))
            if run["gcs_latency_ms"] and self.local and a.compare_gcs_latency is not None:
                ref = next((r for r in runs if r["config"] == run["config"]
                            and r["gcs_latency_ms"] == a.gcs_latency_ms), None)  # fmt: skip
                if ref is not None:
                    gcs.append(compare_points(run, ref))
        notes = list(self.notes) + report_notes(a, runs, self.extra.get("model", {}), self.faults_injected)
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
            "device": a.device if self.local else "as deployed",
            "workload": {**self.spec.as_dict(), "jobs_per_point": a.jobs, "concurrencies": a.concurrencies,
                         "rates": a.rates, "ref_seconds": a.ref_seconds, "warmup_jobs": a.warmup_jobs,
                         "offered": describe([j for p in points for j in p.jobs])},  # fmt: skip
            "configs": {r["run"]: r["settings"] for r in runs},
            "order": a.order if self.local else "sequential",
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
