"""A real Prometheus (Debian's `prometheus` binary, our own process on 127.0.0.1) scrapes a worker that runs jobs
through the real RunPod loop (`python -m server` against testing/runpod_fake.py, storage on fake-gcs-server), with
deploy/prometheus/alerts.yml loaded. After the jobs, Prometheus's HTTP API must report what the jobs produced:
jobs completed, batch rows and batches, cache hits and misses, stage and job duration counts, and every alert rule
evaluating without error and none firing. Then every metric the README's Metrics section names must have an observed
sample (a metric nobody feeds fails that test). The worker streams (STREAMING=on): the first jobs ask for no
stream, the later ones stream, so both paths feed the metrics. Storage goes through testing/faultproxy.py, which injects the faults
that feed the storage retry and error counters.

Skipped only when the `prometheus` binary is absent (scripts/setup.sh installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from testing.accounts import ServiceAccount
from testing.e2e_worker import (
    BUCKET,
    OTHER_BUCKET,
    REPO,
    RUN_TIMEOUT_S,
    VOICES,
    E2EWorker,
    running_worker,
    worker_env,
)
from testing.faultproxy import FaultProxy
from testing.gcs_emulator import GcsEmulator
from testing.loopback import ServerProcess, free_port
from testing.runpod_fake import COMPLETED, FAILED, FakeRunPod

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not installed (Debian package "
                       "`prometheus`; scripts/setup.sh installs it)"),  # fmt: skip
]

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL_S = 1
SETTLE_TIMEOUT_S = 60.0  # hang guard: Prometheus must have scraped the final values by then

# 8 short jobs (cheap on a CPU), 2 voices: batches form, each voice is conditioned once.
TEXTS = ("Olá! Tudo bem?", "Bom dia.", "Hello there.", "Uma frase curta.")
JOBS = tuple(
    {"gen_text": TEXTS[i % len(TEXTS)], "ref_audio_url": VOICES[i % 2].url, "voice_id": VOICES[i % 2].voice_id,
     "language": "en" if "Hello" in TEXTS[i % len(TEXTS)] else "pt", "seed": i, "stream": False}
    for i in range(8)
)  # fmt: skip


def result_of(output: object) -> dict:
    """The worker streams (STREAMING=on, return_aggregate_stream): a job's output is its items, the result last."""
    assert isinstance(output, list) and output[-1]["type"] == "result", output
    return output[-1]


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, base: str):
        self.base = base

    def api(self, path: str, **params: str) -> object:
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = self.query(promql)
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None


@contextlib.contextmanager
def prometheus_process(folder: Path, metrics_port: int) -> Iterator[Prometheus]:
    """Our own Prometheus: a temporary config and data folder, loopback only, 1 s scrapes, no remote anything."""
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "xtts-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))  # fmt: skip
    port = free_port()
    log_path = folder / "prometheus.log"
    args = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"]  # fmt: skip
    with ServerProcess(args, log_path, cwd=folder, what="prometheus") as server:
        base = f"http://127.0.0.1:{port}"
        server.wait_ready(f"{base}/-/ready", 60)
        yield Prometheus(base)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gcs_proxy(gcs_bucket: GcsEmulator) -> AsyncIterator[FaultProxy]:
    """The worker's GCS traffic passes through a fault proxy (no faults until a test asks for them)."""
    async with FaultProxy(gcs_bucket.url) as proxy:
        yield proxy


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def monitored_worker(
    fake_runpod: FakeRunPod, gcs_proxy: FaultProxy, service_account: ServiceAccount, tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[E2EWorker, FakeRunPod, Prometheus]]:  # fmt: skip
    folder = tmp_path_factory.mktemp("e2e-prometheus")
    metrics_port = free_port()
    env = worker_env(
        XTTS_MODEL_DIR=str(tiny_checkpoint), XTTS_DEVICE="cpu", MAX_CONCURRENCY="16", MAX_BATCH_SIZE="8",
        BATCH_WAIT_MS="100", METRICS_PORT=str(metrics_port), LATENT_CACHE_DIR=str(folder / "latent_cache"),
        AUDIO_CACHE_DIR=str(folder / "audio_cache"), STORAGE_BACKEND="gcs", STORAGE_EMULATOR_HOST=gcs_proxy.url,
        GCS_BUCKET_NAME=BUCKET, GCS_CREDENTIALS=service_account.json, ALLOWED_BUCKETS=f"{BUCKET},{OTHER_BUCKET}",
        STREAMING="on",
    )  # fmt: skip
    with prometheus_process(folder, metrics_port) as prometheus:
        async with running_worker("prometheus-worker", fake_runpod, env, folder, metrics_port=metrics_port) as worker:
            yield worker, fake_runpod, prometheus


async def settled(prometheus: Prometheus, promql: str, expected: float) -> float | None:
    """Poll `promql` until Prometheus reports `expected` (its next scrapes catch up) or the guard runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT_S
    while True:
        got = await asyncio.to_thread(prometheus.value, promql)
        if got == expected or loop.time() > deadline:
            return got
        await asyncio.sleep(SCRAPE_INTERVAL_S / 2)


@pytest.mark.asyncio(loop_scope="module")
async def test_prometheus_scrapes_what_the_jobs_produced(monitored_worker):
    worker, runpod, prometheus = monitored_worker
    assert await settled(prometheus, 'up{job="xtts-worker"}', 1.0) == 1.0, "Prometheus never scraped the worker"

    ids = [runpod.enqueue(dict(job)) for job in JOBS]
    jobs = await runpod.wait_done(ids, timeout_s=RUN_TIMEOUT_S)
    outputs = [result_of(job.output) for job in jobs.values()]
    assert all(job.state == COMPLETED for job in jobs.values()), [job.result for job in jobs.values()]

    # What the jobs themselves reported: the numbers Prometheus must show.
    n = len(JOBS)
    segments = sum(out["segments"] for out in outputs)
    latent_hits = sum(out["latent_cache_hit"] for out in outputs)
    reference_hits = sum(out["reference_cache_hit"] for out in outputs)
    by_language = {lang: sum(1 for j in JOBS if j["language"] == lang) for lang in {j["language"] for j in JOBS}}
    # And the worker's own endpoint, read directly (the batch count is not in the job outputs).
    direct = await worker.metrics()

    expectations = {
        'sum(xtts_jobs_total{status="completed"})': n,
        'sum(xtts_jobs_total{status=~"failed|invalid|cancelled"}) or vector(0)': 0,
        **{f'sum(xtts_jobs_total{{status="completed", language="{lang}"}})': count
           for lang, count in by_language.items()},
        'sum(xtts_job_duration_seconds_count{status="completed"})': n,
        # Continuous batching: every segment is admitted once; the batch-size histogram is observed once per
        # decoding step (rows in that step), so its count is the steps and its sum the row-steps.
        "sum(xtts_admitted_rows_total)": segments,
        "sum(xtts_batch_size_rows_count)": direct.batches,
        "sum(xtts_batch_size_rows_sum)": direct.batch_rows,
        'sum(xtts_cache_hits_total{cache="latents"})': latent_hits,
        'sum(xtts_cache_misses_total{cache="latents"})': n - latent_hits,
        'sum(xtts_cache_hits_total{cache="reference_audio"})': reference_hits,
        'sum(xtts_cache_misses_total{cache="reference_audio"})': n - reference_hits,
        **{f'sum(xtts_stage_duration_seconds_count{{stage="{stage}"}})': n
           for stage in ("queue_wait", "generation", "encode", "upload")},
        'sum(xtts_stage_duration_seconds_count{stage="download"})': n - reference_hits,
        'sum(xtts_stage_duration_seconds_count{stage="conditioning"})': n - latent_hits,
        'sum(xtts_stage_duration_seconds_count{stage="vocoder"})': direct.total(
            "xtts_stage_duration_seconds_count", stage="vocoder"),
        "sum(xtts_jobs_in_flight)": 0,
        "sum(xtts_queue_depth_requests)": 0,
    }  # fmt: skip
    report = {}
    for promql, expected in expectations.items():
        report[promql] = (await settled(prometheus, promql, float(expected)), float(expected))
    print("\nPrometheus query -> (got, expected):")
    for promql, (got, expected) in report.items():
        print(f"  {promql:<75} {got} {expected}")
    wrong = {q: v for q, v in report.items() if v[0] != v[1]}
    assert not wrong, wrong

    # Values, not only counts: the stage sums are the time the jobs spent; the batches were real batches.
    assert direct.batch_rows >= segments  # each row took part in at least one step
    assert 1 <= direct.total("xtts_stage_duration_seconds_count", stage="vocoder") <= segments  # rows vocoded
    generation_s = prometheus.value('sum(xtts_stage_duration_seconds_sum{stage="generation"})')
    assert generation_s and generation_s > 0
    assert abs(generation_s - direct.total("xtts_stage_duration_seconds_sum", stage="generation")) < 1e-6
    p95 = prometheus.value(
        'histogram_quantile(0.95, sum by (le) (xtts_stage_duration_seconds_bucket{stage="generation"}))')
    assert p95 is not None and p95 > 0
    audio_s = prometheus.value("sum(xtts_audio_generated_seconds_total)")
    assert audio_s and abs(audio_s - sum(out["duration"] for out in outputs)) < 0.05 * n
    info = prometheus.query("xtts_engine_info")
    assert [r["metric"].get("engine") for r in info] == ["batched"] and info[0]["metric"]["device"] == "cpu"

    # deploy/prometheus/alerts.yml, evaluated by this Prometheus against the live series: no error, none firing.
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules
    assert prometheus.query('ALERTS{alertstate="firing"}') == []


# Fed only where the worker runs on CUDA (torch's allocator); this CPU test cannot observe it.
CUDA_ONLY = {"xtts_gpu_memory_bytes"}
# Moves only when every row is taken by streams and another stream's first segment waits: a scheduling state
# this load does not force. tests/batching/test_streaming.py (test_a_stream_waiting_for_a_row_takes_one_...)
# forces it on the real engine and checks the hook; tests/server/test_worker_metrics.py checks the counter.
CONTENTION_ONLY = {"xtts_preempted_rows_total"}
# Fed only in SERVER_MODE=http (this worker runs the queue mode): tests/http/ checks it.
HTTP_ONLY = {"xtts_http_refusals_total", "xtts_http_clients_dropped_total"}


def documented_metrics() -> set[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Metrics")
    section = readme[start: readme.index("\n## ", start + 5)]
    return set(re.findall(r"`(xtts_[a-z0-9_]+)", section))


@pytest.mark.asyncio(loop_scope="module")
async def test_every_documented_metric_is_fed(monitored_worker, gcs_proxy):
    """Runs after the exact-count test (same worker). Every metric the README's Metrics section names shows a
    non-zero sample while or after jobs run (a counter that moved, a histogram with observations, a gauge that
    was up: gauges are read every 50 ms while the jobs run, as they are 0 again at rest). Storage faults are
    injected so the storage counters must move too."""
    worker, runpod, _ = monitored_worker
    documented = documented_metrics()
    assert {"xtts_jobs_total", "xtts_jobs_in_flight", "xtts_storage_retries_total"} <= documented

    # A new voice whose first download meets two 503s (retried), a reference that does not exist (a final
    # error), and more jobs than one batch holds (so some wait in the queue). The other voices' references are
    # cached already: the new voice's download is the only one the proxy sees fail.
    voice = VOICES[2]
    gcs_proxy.fail_next(2, 503, method="GET", path_contains=voice.url.rsplit("/", 1)[-1])
    missing = dict(JOBS[0], ref_audio_url=VOICES[0].url.replace(".wav", "-missing.wav"), voice_id="missing-voice")
    retried = dict(JOBS[0], ref_audio_url=voice.url, voice_id=f"{voice.voice_id}-retried", seed=99)
    ids = [runpod.enqueue(retried), runpod.enqueue(missing)]
    # These stream (no "stream": false): the streaming metrics move too.
    ids += [runpod.enqueue({**{k: v for k, v in JOBS[i % len(JOBS)].items() if k != "stream"}, "seed": 100 + i})
            for i in range(12)]  # fmt: skip

    peak: dict[str, float] = {}
    done = asyncio.ensure_future(runpod.wait_done(ids, timeout_s=RUN_TIMEOUT_S))
    while True:
        scrape = await worker.metrics()
        for (sample, _labels), value in scrape.samples.items():
            peak[sample] = max(peak.get(sample, 0.0), value)
        if done.done():
            break
        await asyncio.sleep(0.05)
    jobs = done.result()
    assert jobs[ids[1]].state == FAILED and "[ref_audio_not_found]" in jobs[ids[1]].result["error"]
    others = [jobs[i] for i in ids if i != ids[1]]
    assert all(job.state == COMPLETED for job in others), [job.result for job in others]

    fed = {name: max(peak.get(name, 0.0), peak.get(f"{name}_count", 0.0)) for name in documented}
    exempt = CUDA_ONLY | CONTENTION_ONLY | HTTP_ONLY
    unfed = sorted(name for name, value in fed.items() if value <= 0 and name not in exempt)
    assert not unfed, f"documented in the README but never observed through the real loop: {unfed}"
    assert scrape.total("xtts_storage_retries_total", reason="5xx") == 2
    assert scrape.total("xtts_storage_errors_total", reason="ref_audio_not_found") == 1
