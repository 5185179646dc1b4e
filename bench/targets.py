"""Where the load goes, and what is watched while it runs.

- `LocalTarget`: jobs are queued on a FakeRunPod (testing.runpod_fake) that a real worker process (`python -m
  server` in RunPod's production mode) takes them from; latency is from enqueue to the worker's result POST.
- `EndpointTarget`: a RunPod endpoint over HTTP: `/run` then `/status/{id}` until the job ends, or `/runsync`.
  Works against api.runpod.ai and against the SDK's local test API (`python -m server --rp_serve_api`), whose
  routes have no endpoint id (`/run`, `/runsync`, POST `/status/{id}`; read from runpod 1.12's
  serverless/modules/rp_fastapi.py). That API runs a /run job only when its /status is asked, inside that call.
- `HttpTarget`: a worker in HTTP mode (SERVER_MODE=http, RunPod's load-balancing endpoints) or any server of
  OpenAI's speech API: one `POST /v1/audio/speech` per job, its body streamed as raw PCM; time to first audio is
  when the first byte of the body reached the client, latency when the last did.
- `MetricsScraper`: the worker's Prometheus endpoint, scraped before and after each load point.
- `RssSampler`: the worker process's resident memory (psutil), sampled every `interval_s`.

Every loop here is bounded: by a job count, and by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.stats import Snapshot
from bench.workload import JobSpec
from testing.runpod_fake import CANCELLED, COMPLETED, FAILED, FakeRunPod

log = logging.getLogger("bench")

# Statuses of a JobRecord besides RunPod's COMPLETED / FAILED / CANCELLED.
TIMED_OUT = "TIMED_OUT"  # no result within the job timeout (the job is then cancelled)
NOT_STARTED = "NOT_STARTED"  # the point's deadline passed before the job was offered
CLIENT_ERROR = "CLIENT_ERROR"  # the HTTP exchange with the endpoint failed


@dataclass
class JobRecord:
    """One job as the load generator saw it, plus what the worker said about it in its output."""

    index: int
    voice: int
    language: str
    chars: int
    length_class: str
    status: str
    submitted_at: float | None = None  # monotonic
    finished_at: float | None = None
    latency_s: float | None = None  # end to end: submitted -> result available to the client
    platform_queue_s: float | None = None  # time in RunPod's queue before a worker took it (fake: take - enqueue)
    execution_s: float | None = None  # RunPod's executionTime (endpoint target), seconds
    first_audio_s: float | None = None  # streamed jobs: submitted -> first stream message (fake: its arrival)
    error: str | None = None
    # From the job's output (the worker's own account):
    audio_s: float | None = None  # "duration"
    queue_wait_s: float | None = None  # "queue_wait": waiting for the GPU scheduler
    generation_s: float | None = None  # "generation_time": text prep + conditioning + queue + batches
    synthesis_s: float | None = None  # generation_time - queue_wait: conditioning and the batches themselves
    worker_total_s: float | None = None  # "total_time": the handler, start to reply
    batch_size: int | None = None
    latent_cache_hit: bool | None = None
    reference_cache_hit: bool | None = None

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    def take_output(self, output: Any) -> None:
        if isinstance(output, list):  # a streamed job's aggregate: its items, the result last
            output = next((i for i in reversed(output) if isinstance(i, dict) and i.get("type") == "result"), None)
        if not isinstance(output, dict):
            return

        def num(key: str) -> float | None:
            value = output.get(key)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        self.audio_s = num("duration")
        self.queue_wait_s = num("queue_wait")
        self.generation_s = num("generation_time")
        if self.generation_s is not None and self.queue_wait_s is not None:
            self.synthesis_s = max(0.0, self.generation_s - self.queue_wait_s)
        self.worker_total_s = num("total_time")
        size = num("batch_size")
        self.batch_size = int(size) if size is not None else None
        for key in ("latent_cache_hit", "reference_cache_hit"):
            if isinstance(output.get(key), bool):
                setattr(self, key, output[key])

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def new_record(job: JobSpec, status: str) -> JobRecord:
    return JobRecord(job.index, job.voice, job.language, job.chars, job.length_class, status)


def _error_text(result: Any) -> str:
    if isinstance(result, dict):
        error = result.get("error")
        output = result.get("output")
        code = output.get("error_code") if isinstance(output, dict) else None
        text = error if isinstance(error, str) else json.dumps(error)[:300]
        # Errors of this worker start with "[code]" already; older ones (and the SDK's own) may not.
        return f"{code}: {text}" if code and not text.startswith(f"[{code}") else text
    return str(result)[:300]


# ---------------------------------------------------------------------------------------------- targets


class LocalTarget:
    """Jobs through a FakeRunPod that a worker process polls. Call from the fake's event loop."""

    name = "local"

    def __init__(self, fake: FakeRunPod, to_input: Callable[[JobSpec], dict]):
        self.fake = fake
        self.to_input = to_input

    async def run_job(self, job: JobSpec, timeout_s: float) -> JobRecord:
        record = new_record(job, TIMED_OUT)
        fake = self.fake
        job_id = fake.enqueue(self.to_input(job))
        record.submitted_at = time.monotonic()
        try:
            done = await fake.wait_done([job_id], timeout_s)
        except TimeoutError:
            fake.cancel(job_id)  # dequeued, or stopped in the worker: it must not spill into the next point
            record.error = f"no result within {timeout_s:.0f} s"
            return record
        except asyncio.CancelledError:
            fake.cancel(job_id)
            raise
        fj = done[job_id]
        record.status = fj.state
        record.finished_at = time.monotonic()
        if fj.done_at is not None:
            record.latency_s = fj.done_at - fj.enqueued_at
        if fj.taken_at is not None:
            record.platform_queue_s = fj.taken_at - fj.enqueued_at
        if fj.stream_at and fj.stream[0].get("output", {}).get("type") == "audio":
            record.first_audio_s = fj.stream_at[0] - fj.enqueued_at
        if fj.state == COMPLETED:
            record.take_output(fj.output)
        elif fj.state == FAILED:
            record.error = _error_text(fj.result)
        elif fj.state == CANCELLED:
            record.error = "cancelled"
        return record


class HttpTarget:
    """Jobs as OpenAI speech requests to an HTTP-mode worker (or a RunPod load-balancing endpoint's URL).
    `await start()` first, `await close()` after."""

    name = "http"
    SAMPLE_RATE = 24000  # OpenAI's `pcm`: 16-bit little-endian mono at 24 kHz

    def __init__(self, base_url: str, to_input: Callable[[JobSpec], dict], *, api_key: str | None = None,
                 model: str = "xtts-v2"):  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.to_input = to_input
        self.api_key = api_key
        self.model = model
        self._session: aiohttp.ClientSession | None = None

    def describe(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "route": "/v1/audio/speech", "response_format": "pcm",
                "stream_format": "audio", "model": self.model}  # fmt: skip

    async def start(self) -> HttpTarget:
        if not self.api_key and not is_loopback_url(self.base_url):
            raise EndpointError(f"no API key for {self.base_url}: set RUNPOD_API_KEY (only a loopback URL may go "
                                "without one)")  # fmt: skip
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # One connection per job in flight: the default pool (100) is larger than any concurrency asked here.
        self._session = aiohttp.ClientSession(headers=headers, trust_env=False,
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_ready(self, interval_s: float = 0.25) -> None:
        """Until GET /ping answers 200 (the worker's model is loaded: 204 before, and nothing listens before
        that). Unbounded: the caller bounds it."""
        assert self._session is not None, "start() first"
        while True:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self._session.get(f"{self.base_url}/ping", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(interval_s)

    def request_body(self, job: JobSpec) -> dict[str, Any]:
        """The job's seed payload as OpenAI's speech request; the worker's own fields ride along (`extra_body`)."""
        seed = self.to_input(job)
        body = {"model": self.model, "input": seed["gen_text"], "voice": seed["voice_id"],
                "response_format": "pcm", "stream_format": "audio", "speed": seed.get("speed", 1.0)}  # fmt: skip
        for key in ("ref_audio_url", "language", "temperature", "top_k", "top_p", "seed"):
            if key in seed:
                body[key] = seed[key]
        return body

    async def run_job(self, job: JobSpec, timeout_s: float) -> JobRecord:
        assert self._session is not None, "start() first"
        record = new_record(job, TIMED_OUT)
        started = time.monotonic()
        record.submitted_at = started
        received = 0
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.post(f"{self.base_url}/v1/audio/speech", json=self.request_body(job)) as r:
                    if r.status != 200:
                        text = await r.text()
                        record.status = FAILED
                        record.error = f"HTTP {r.status}: {_openai_error(text)}"
                        record.finished_at = time.monotonic()
                        record.latency_s = record.finished_at - started
                        return record
                    async for chunk in r.content.iter_any():
                        if chunk and record.first_audio_s is None:
                            record.first_audio_s = time.monotonic() - started
                        received += len(chunk)
        except TimeoutError:
            record.error = f"no complete response within {timeout_s:.0f} s"
            return record
        except aiohttp.ClientError as exc:
            record.status = CLIENT_ERROR
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            return record
        record.finished_at = time.monotonic()
        record.latency_s = record.finished_at - started
        if received == 0 or received % 2:
            record.status = FAILED
            record.error = f"the body held {received} bytes: not 16-bit PCM audio"
            return record
        record.status = COMPLETED
        record.audio_s = received / 2 / self.SAMPLE_RATE
        return record


def _openai_error(text: str) -> str:
    """The message of OpenAI's error shape {"error": {"message", "type", "code"}}, or the body's start."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:300]
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    return text[:300]


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EndpointError(RuntimeError):
    """The endpoint cannot be used (wrong URL, no API key, routes not found)."""


class EndpointTarget:
    """A RunPod endpoint (or the SDK's local test API) over HTTP. `await start()` first, `await close()` after."""

    name = "endpoint"
    TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, "TIMED_OUT"})

    def __init__(
        self,
        base_url: str,
        endpoint_id: str,
        to_input: Callable[[JobSpec], dict],
        *,
        api_key: str | None = None,
        mode: str = "run",
        layout: str = "auto",
        status_method: str = "auto",
        poll_interval_s: float = 0.5,
        submit_attempts: int = 3,
        stream: bool = False,
    ):
        if mode not in ("run", "runsync"):
            raise ValueError(f"mode must be run or runsync, got {mode!r}")
        if layout not in ("auto", "runpod", "flat"):
            raise ValueError(f"layout must be auto, runpod or flat, got {layout!r}")
        if status_method not in ("auto", "get", "post"):
            raise ValueError(f"status method must be auto, get or post, got {status_method!r}")
        if stream and mode != "run":
            raise ValueError("streaming polls /stream/{job_id} after /run: mode must be run")
        self.base_url = base_url.rstrip("/")
        self.endpoint_id = endpoint_id
        self.to_input = to_input
        self.api_key = api_key
        self.mode = mode
        self.layout = layout
        self.status_method = status_method
        self.poll_interval_s = poll_interval_s
        self.submit_attempts = max(1, submit_attempts)
        self.stream = stream  # read /stream/{id} (a STREAMING=on worker's items) instead of polling /status
        self.health: dict | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def api_root(self) -> str:
        return f"{self.base_url}/{self.endpoint_id}" if self.layout == "runpod" else self.base_url

    def describe(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url, "endpoint_id": self.endpoint_id, "mode": self.mode, "layout": self.layout,
            "status_method": self.status_method, "poll_interval_s": self.poll_interval_s,
            "stream": self.stream, "health_at_start": self.health,
        }  # fmt: skip

    async def start(self) -> EndpointTarget:
        if not self.api_key and not is_loopback_url(self.base_url):
            raise EndpointError("RUNPOD_API_KEY is not set: the endpoint target needs an API key for "
                                f"{self.base_url} (only a loopback --base-url may go without one)")  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._session = aiohttp.ClientSession(headers=headers, trust_env=False,
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        try:
            await self._resolve_layout()
        except BaseException:
            await self.close()
            raise
        if self.status_method == "auto":
            # api.runpod.ai: GET /status/{id}; the SDK's local test API (runpod 1.12) routes only POST.
            self.status_method = "get" if self.layout == "runpod" else "post"
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _resolve_layout(self) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=15)
        if self.layout in ("auto", "runpod"):
            try:
                async with self._session.get(f"{self.base_url}/{self.endpoint_id}/health", timeout=timeout) as r:
                    if r.status == 200:
                        self.health = await r.json(content_type=None)
                        self.layout = "runpod"
                        return
                    if r.status in (401, 403):
                        raise EndpointError(f"{self.base_url}/{self.endpoint_id}/health answered {r.status}: "
                                            "check RUNPOD_API_KEY")  # fmt: skip
            except aiohttp.ClientError as exc:
                raise EndpointError(f"cannot reach {self.base_url}: {exc}") from exc
            if self.layout == "runpod":
                return  # forced: go on without the health answer
        try:
            async with self._session.get(f"{self.base_url}/openapi.json", timeout=timeout) as r:
                spec = await r.json(content_type=None) if r.status == 200 else {}
        except (aiohttp.ClientError, ValueError) as exc:
            raise EndpointError(f"cannot reach {self.base_url}: {exc}") from exc
        paths = spec.get("paths", {}) if isinstance(spec, dict) else {}
        if "/runsync" in paths and "/run" in paths:
            self.layout = "flat"
            return
        if self.layout == "flat":
            return
        raise EndpointError(
            f"no RunPod API at {self.base_url}: neither {self.base_url}/{self.endpoint_id}/health nor the local "
            "test API's /openapi.json answered; check --base-url and --endpoint-id"
        )

    async def _call(self, method: str, url: str, body: Any = None, timeout_s: float = 60.0) -> tuple[int, Any]:
        assert self._session is not None
        kwargs: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=max(1.0, timeout_s))}
        if body is not None:
            kwargs["json"] = body
        async with self._session.request(method, url, **kwargs) as r:
            text = await r.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            return r.status, data

    async def _submit(self, route: str, body: dict, deadline: float) -> dict:
        """POST /run or /runsync, retrying 429/5xx/connection errors a few times (bounded by the deadline)."""
        last = ""
        for attempt in range(self.submit_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                status, data = await self._call("POST", f"{self.api_root}/{route}", body, remaining)
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200 and isinstance(data, dict):
                    return data
                last = f"HTTP {status}: {str(data)[:200]}"
                if status not in (429, 500, 502, 503, 504):
                    break
            await asyncio.sleep(min(2.0 * (attempt + 1), max(0.0, deadline - time.monotonic())))
        raise EndpointError(f"/{route} failed: {last}")

    async def _status(self, job_id: str, deadline: float) -> dict:
        remaining = deadline - time.monotonic()
        url = f"{self.api_root}/status/{job_id}"
        status, data = await self._call(self.status_method.upper(), url, None, remaining)
        if status == 405:  # the other method, once, and remember it
            self.status_method = "post" if self.status_method == "get" else "get"
            status, data = await self._call(self.status_method.upper(), url, None, remaining)
        if status != 200 or not isinstance(data, dict):
            raise EndpointError(f"/status answered HTTP {status}: {str(data)[:200]}")
        return data

    async def _stream(self, job_id: str, deadline: float) -> dict:
        """One read of /stream/{id}: RunPod answers the items posted since the last read (`stream`: a list of
        {"output": item}) and the job's status; the SDK's local test API runs the whole job inside the call and
        answers every item at once."""
        remaining = deadline - time.monotonic()
        url = f"{self.api_root}/stream/{job_id}"
        status, data = await self._call(self.status_method.upper(), url, None, remaining)
        if status == 405:
            self.status_method = "post" if self.status_method == "get" else "get"
            status, data = await self._call(self.status_method.upper(), url, None, remaining)
        if status != 200 or not isinstance(data, dict):
            raise EndpointError(f"/stream answered HTTP {status}: {str(data)[:200]}")
        return data

    async def _cancel(self, job_id: str) -> None:
        if self.layout != "runpod":
            return  # the local test API has no /cancel
        with contextlib.suppress(Exception):
            await self._call("POST", f"{self.api_root}/cancel/{job_id}", None, 10)

    async def run_job(self, job: JobSpec, timeout_s: float) -> JobRecord:
        record = new_record(job, TIMED_OUT)
        started = time.monotonic()
        deadline = started + timeout_s
        record.submitted_at = started
        job_id = None
        try:
            data = await self._submit(self.mode, {"input": self.to_input(job)}, deadline)
            job_id = data.get("id")
            items: list = []
            polls = 0
            max_polls = int(timeout_s / max(0.05, self.poll_interval_s)) + 10
            while data.get("status") not in self.TERMINAL:
                if not job_id:
                    raise EndpointError(f"no job id in {str(data)[:200]}")
                if time.monotonic() >= deadline or polls >= max_polls:
                    raise TimeoutError
                if polls:
                    await asyncio.sleep(min(self.poll_interval_s, max(0.0, deadline - time.monotonic())))
                polls += 1
                if not self.stream:
                    data = await self._status(job_id, deadline)
                    continue
                data = await self._stream(job_id, deadline)
                got = [i.get("output") if isinstance(i, dict) else i for i in data.get("stream") or []]
                if record.first_audio_s is None and any(isinstance(i, dict) and i.get("type") == "audio"
                                                        for i in got):  # fmt: skip
                    record.first_audio_s = time.monotonic() - started  # as the client got it: poll granularity
                items += got
                if data.get("status") == COMPLETED and not any(
                        isinstance(i, dict) and i.get("type") == "result" for i in items):
                    data = await self._status(job_id, deadline)  # the result, from the job's aggregate output
        except (TimeoutError, asyncio.TimeoutError):
            record.error = f"no result within {timeout_s:.0f} s"
            if job_id:
                await self._cancel(job_id)
            return record
        except (EndpointError, aiohttp.ClientError) as exc:
            record.status = CLIENT_ERROR
            record.error = str(exc)[:300]
            return record
        except asyncio.CancelledError:
            if job_id:
                await asyncio.shield(self._cancel(job_id))
            raise
        record.finished_at = time.monotonic()
        record.latency_s = record.finished_at - started
        record.status = data.get("status")
        if isinstance(data.get("delayTime"), int | float):
            record.platform_queue_s = data["delayTime"] / 1000.0
        if isinstance(data.get("executionTime"), int | float):
            record.execution_s = data["executionTime"] / 1000.0
        if record.status == COMPLETED:
            record.take_output(data.get("output") if data.get("output") is not None else items)
        else:
            record.error = _error_text(data)
        return record


# ------------------------------------------------------------------------------------------- observers


class MetricsScraper:
    """GETs a Prometheus text endpoint; a failed scrape gives None (the report then says "n/a")."""

    def __init__(self, url: str | None):
        self.url = url
        self.failures = 0

    async def scrape(self, session: aiohttp.ClientSession) -> Snapshot | None:
        if not self.url:
            return None
        try:
            async with session.get(self.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    raise aiohttp.ClientError(f"HTTP {r.status}")
                return Snapshot.parse(await r.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.failures += 1
            log.warning("metrics scrape of %s failed: %s", self.url, exc)
            return None


class RssSampler:
    """Samples a process's RSS every `interval_s` in an asyncio task, until stop() or the process ends."""

    def __init__(self, pid: int | None, interval_s: float = 1.0):
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic time, rss bytes)
        self._task: asyncio.Task | None = None
        self._process = None

    def start(self) -> RssSampler:
        if self.pid is None:
            return self
        import psutil

        try:
            self._process = psutil.Process(self.pid)
        except psutil.Error as exc:
            log.warning("cannot watch pid %s: %s", self.pid, exc)
            return self
        self.sample()
        self._task = asyncio.ensure_future(self._run())
        return self

    def sample(self) -> int | None:
        if self._process is None:
            return None
        import psutil

        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            return None
        self.samples.append((time.monotonic(), rss))
        return rss

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.sample() is None:
                return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def peak(self, since: float | None = None, until: float | None = None) -> int | None:
        values = [rss for t, rss in self.samples
                  if (since is None or t >= since) and (until is None or t <= until)]  # fmt: skip
        return max(values) if values else None

    def at(self, t: float) -> int | None:
        """The first sample taken at or after t (else the last one)."""
        for ts, rss in self.samples:
            if ts >= t:
                return rss
        return self.samples[-1][1] if self.samples else None
