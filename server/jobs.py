"""One job's life, written once for every protocol: the RunPod queue job (`TTSHandler.__call__`), the RunPod
streamed job (`TTSHandler.stream`) and an HTTP request (`TTSHandler.speech`, server.http_server).

    async with core.job(job_id, raw) as job:      # begin: id, log, start time, deadline; counted in flight
        job.request = validate(...)               # the protocol edge translates in ...
        async with core.deadline(job):            # JOB_TIMEOUT_S around one await (never around a yield)
            job.output = await synthesis.run(job)
    return job.output                             # ... and out: the output, or the failure's error output

On the way out of the block the core counts the job (xtts_jobs_total: completed, invalid, failed, cancelled; its
duration), lets its in-flight slot go (xtts_jobs_in_flight) and, for a failure, logs it and turns it into
`{"error", "error_code"[, "retryable"]}` (server.validation.error_output, the one place that does so): kept in
`job.output` (errors="output": the RunPod handlers answer with it) or raised on after counting (errors="raise":
the HTTP layer answers it in OpenAI's shape). A job stopped from outside (RunPod's cancel or timeout: a
CancelledError; a closed generator: GeneratorExit) is logged and counted cancelled, and the stop goes on.

The deadline is the job's own, on the core's clock: `core.deadline(job)` around an await, `core.in_time(job,
items)` around each item of a stream (a reader's time between items is not the job's), and `job.deadline` for
the scheduler's request. Past it: JobTimeoutError (job_timeout, retryable), naming JOB_TIMEOUT_S.

Log lines go to the `server.handler` logger (the name operators filter on), each starting with `[job id]`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batching import InputError
from batching.errors import JobTimeoutError
from server.validation import ValidationError, error_output
from storage import StorageInputError

if TYPE_CHECKING:
    from batching import SpeechResult
    from server.metrics import Metrics
    from server.validation import TTSRequest

log = logging.getLogger("server.handler")

STOPPED_BY_RUNPOD = "job stopped by RunPod after %.2f s"


def runpod_job_id(raw: Any) -> str:
    """A RunPod job's id, as its log lines and metrics name it ("-" when the job has none)."""
    return str(raw.get("id", "-")) if isinstance(raw, dict) else "-"


def is_client_error(exc: BaseException) -> bool:
    """The caller's mistake (counted invalid), not the worker's (counted failed)."""
    return isinstance(exc, ValidationError | StorageInputError | InputError)


@dataclass
class Job:
    """One job on its way through the worker: what every step of it needs besides the context."""

    id: str
    log: logging.LoggerAdapter
    started: float  # on the core's clock
    deadline: float  # started + JOB_TIMEOUT_S, on the same clock
    raw: dict = field(default_factory=dict)  # the RunPod job (progress updates name it); {} for an HTTP request
    request: TTSRequest | None = None  # set by the protocol edge once the input is valid
    output: dict | None = None  # the job's output; its error output once it failed
    failed: bool = False
    first_audio_s: float | None = None  # a streamed job: when its first audio left

    @property
    def language(self) -> str:
        return self.request.language if self.request is not None else "unknown"


class InFlight:
    """How many are in flight, with an event set whenever none is (a drain waits on it) and an optional gauge."""

    def __init__(self, gauge: Any = None):
        self.count = 0
        self._gauge = gauge
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()
        if self._gauge is not None:
            self._gauge.inc()

    def leave(self) -> None:
        self.count -= 1
        if self._gauge is not None:
            self._gauge.dec()
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class JobCore:
    """Begin, deadline, in-flight count, failure to output, and the job metrics: once, for every protocol."""

    def __init__(self, timeout_s: float, metrics: Metrics | None, clock: Callable[[], float]):
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.clock = clock
        self.in_flight = InFlight(metrics.jobs_in_flight if metrics else None)

    def job(self, job_id: str, raw: dict | None = None, *, errors: str = "output",
            stopped: str = STOPPED_BY_RUNPOD) -> JobScope:  # fmt: skip
        """The job's `async with` block (see the module's docstring). `stopped`: the log line of a stopped job,
        with one %.2f for its seconds."""
        if errors not in ("output", "raise"):
            raise ValueError(f"errors must be 'output' or 'raise', got {errors!r}")
        return JobScope(self, self._new(job_id, raw), errors=errors, stopped=stopped)

    def refused(self, job_id: str, exc: Exception) -> dict:
        """A request refused before it became a job (HTTP mode checks OpenAI's body itself): logged and counted as
        an invalid job, as a queue job with a bad input is. Returns its error output."""
        return self.fail(self._new(job_id, None), exc)

    def _new(self, job_id: str, raw: dict | None) -> Job:
        started = self.clock()
        return Job(job_id, logging.LoggerAdapter(log, {"job_id": job_id}), started, started + self.timeout_s,
                   raw if isinstance(raw, dict) else {})  # fmt: skip

    # ---------------------------------------------------------------- the deadline

    def deadline(self, job: Job) -> JobDeadline:
        """JOB_TIMEOUT_S around one await of the job (never around a yield): JobTimeoutError past it."""
        return JobDeadline(self.timeout_s, job.deadline - self.clock())

    async def in_time(self, job: Job, items: AsyncIterator) -> AsyncIterator:
        """`items`, each awaited under the job's deadline (never across a yield, so a slow reader's time is not the
        job's): a stream that stalls past it ends with JobTimeoutError at the deadline itself, not when the
        scheduler next looks at its rows."""
        while True:
            async with self.deadline(job):
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
            yield item

    # ---------------------------------------------------------------- outcomes and metrics

    def fail(self, job: Job, exc: BaseException) -> dict:
        """A failed job: logged (a project error by its message, anything else with its traceback), counted
        invalid or failed; returns its error output."""
        output = error_output(exc)
        if hasattr(exc, "error_code"):
            job.log.warning("[%s] ✗ %s", job.id, output["error"])  # the message starts with "[code]"
        else:
            job.log.error("[%s] ✗ unexpected %s", job.id, type(exc).__name__, exc_info=exc)
        self.record(job, "invalid" if is_client_error(exc) else "failed")
        return output

    def record(self, job: Job, status: str) -> None:
        if self.metrics:
            self.metrics.record_job(status, job.language, self.clock() - job.started)

    def observe(self, job: Job, result: SpeechResult, generation_s: float) -> None:
        """Metrics and log line of a finished synthesis."""
        if self.metrics:
            self.metrics.observe_stage("queue_wait", result.queue_wait_s)
            self.metrics.observe_stage("generation", result.engine_s)
            self.metrics.record_audio(result.duration_s, result.engine_s)
        job.log.info(
            "[%s] audio generated in %.2f s: %.2f s of audio (queue %.2f s, conditioning %.2f s, latents %s, "
            "batch sizes %s)",
            job.id, generation_s, result.duration_s, result.queue_wait_s, result.conditioning_s,
            "cached" if result.latent_cache_hit else "computed", list(result.batch_sizes),
        )  # fmt: skip

    def first_audio(self, job: Job) -> float:
        """A streamed job's first audio leaves now (once: later calls give the same time): observed and logged."""
        if job.first_audio_s is None:
            job.first_audio_s = self.clock() - job.started
            if self.metrics:
                self.metrics.time_to_first_audio.observe(job.first_audio_s)
            job.log.info("[%s] first audio after %.2f s", job.id, job.first_audio_s)
        return job.first_audio_s


class JobScope:
    """`async with core.job(...) as job`: the job is in flight inside the block; its end is counted on the way out."""

    def __init__(self, core: JobCore, job: Job, *, errors: str, stopped: str):
        self.core = core
        self.job = job
        self.errors = errors
        self.stopped = stopped

    async def __aenter__(self) -> Job:
        self.core.in_flight.enter()
        return self.job

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        core, job = self.core, self.job
        try:
            if exc is None:
                core.record(job, "completed")
            elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
                job.log.info("[%s] " + self.stopped, job.id, core.clock() - job.started)
                core.record(job, "cancelled")
            elif isinstance(exc, Exception):  # every other failure becomes an error output, here and nowhere else
                job.output, job.failed = core.fail(job, exc), True
                return self.errors == "output"
            return False
        finally:
            core.in_flight.leave()


class JobDeadline:
    """asyncio.timeout that raises JobTimeoutError (naming JOB_TIMEOUT_S) when it is its own deadline that passed;
    a TimeoutError from inside (storage, engine) goes on as it is."""

    def __init__(self, limit_s: float, remaining_s: float):
        self.limit_s = limit_s
        self.scope = asyncio.timeout(max(0.0, remaining_s))

    async def __aenter__(self):
        await self.scope.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb):
        try:
            return await self.scope.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if not self.scope.expired():
                raise
            raise JobTimeoutError(f"job did not finish within JOB_TIMEOUT_S={self.limit_s:g} s") from None
