"""The async RunPod handler: one job from input to the seed's response.

    validate (server.validation) -> reference audio (storage.ReferenceCache: disk cache, single-flight download)
    -> synthesis (batching.Scheduler: latent cache, batched GPU decoding) -> encode (thread) -> upload + signed
    URL (storage.store_result) -> {"audio_url", "duration", "voice_id", "language", "generation_time",
    "parameters", ...}

Each protocol edge here only translates (a RunPod job, a streamed job, an HTTP request to a request; output or
audio back); the job's life (begin, JOB_TIMEOUT_S, the in-flight count, failure to output, metrics) is
server.jobs.JobCore's, the steps are server.synthesis's, the context's seams server.context's, the stream items
server.runpod_stream's.

STREAMING=on (`TTSHandler.stream`, an async generator): the same steps, but the audio leaves as it is made:

    validate -> reference -> Scheduler.stream: AudioChunks -> {"type": "audio", ...} items (server.runpod_stream:
    16-bit PCM, each <= MAX_ITEM_S of audio; RunPod takes <= 1 MB per yield) -> encode + upload of the whole
    audio (the chunks joined: the same samples) -> {"type": "result", <the seed's output and additions>,
    "time_to_first_audio"}

A job with "stream": false yields only its result item. A failure before or during the stream yields
`{"error": "[code] message", ...}` as its last item: the SDK ends the job FAILED with that message, and nothing
was uploaded (the upload comes after the last chunk). JOB_TIMEOUT_S bounds the reference fetch and the upload
(never an await across a yield) and, through the request's deadline, the synthesis.

Every failure becomes `{"error", "error_code"[, "retryable"]}` through `server.validation.error_output`, the one
place that does so (in server.jobs); the SDK marks such a job FAILED. A job RunPod stops (cancel, timeout)
arrives here as a CancelledError: it propagates into `Scheduler.submit`, which drops the request before it costs GPU
time.

SERVER_MODE=http (server.http_server) uses the same steps: POST /tts is `__call__`; POST /v1/audio/speech is
`speech` (the audio as AudioChunks then the SpeechResult, or the SpeechResult alone; nothing stored), its
requests checked by server.openai_api (a refused one still logged and counted, through `refused`).

Logs, one line per step, each with the job id: the text's start, voice, language, parameters, cache hits,
times, the stored object's name. Never a reference URL's query (signatures) nor a result's signed URL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

from server.context import HandlerContext, ReferenceSource, SpeechScheduler
from server.jobs import Job, JobCore, runpod_job_id
from server.runpod_stream import (
    AGGREGATE_BYTES_PER_S, MAX_ITEM_S, RUNPOD_RUN_CAP_BYTES, audio_items, warn_of_aggregate,
)  # fmt: skip
from server.synthesis import Synthesis, Synthesized
from server.validation import TTSRequest, error_output, validate_request

if TYPE_CHECKING:
    from batching import SpeechResult
    from batching.streaming import AudioChunk

__all__ = [
    "AGGREGATE_BYTES_PER_S", "MAX_ITEM_S", "RUNPOD_RUN_CAP_BYTES", "HandlerContext", "LazyHandler", "ReferenceSource",
    "SpeechScheduler", "TTSHandler", "audio_items", "make_concurrency_modifier", "make_handler",
]  # fmt: skip

log = logging.getLogger("server.handler")


class TTSHandler:
    """Callable as the RunPod handler: `await handler(job)` returns the job's output dict."""

    def __init__(self, context: HandlerContext):
        self.ctx = context
        self.core = JobCore(context.config.job_timeout_s, context.metrics, context.clock)
        self.synthesis = Synthesis(context, self.core)

    async def __call__(self, raw: dict) -> dict:
        async with self.core.job(runpod_job_id(raw), raw) as job:
            job.request = self._validate(raw)
            async with self.core.deadline(job):
                job.output = await self.synthesis.run(job)
        return job.output

    def _validate(self, raw: dict) -> TTSRequest:
        config = self.ctx.config
        return validate_request(
            raw.get("input") if isinstance(raw, dict) else None, max_text_chars=config.max_text_chars,
            default_language=config.default_language, default_output_format=config.default_output_format,
        )  # fmt: skip

    async def stream(self, raw: dict) -> AsyncIterator[dict]:
        """STREAMING=on: the job's audio items as they are made, then its result item; a failure is yielded as
        `{"error": "[code] message", ...}`, which the SDK turns into a FAILED job with that message."""
        async with self.core.job(runpod_job_id(raw), raw, stopped="job stopped after %.2f s") as job:
            job.request = self._validate(raw)
            items = self._run_stream(job) if job.request.stream else self._result_only(job)
            async with aclosing(items):
                async for item in items:
                    yield item
        if job.failed:
            yield job.output

    async def _result_only(self, job: Job) -> AsyncIterator[dict]:
        """A job that asked for no stream ("stream": false): only its result item."""
        async with self.core.deadline(job):
            output = await self.synthesis.run(job)
        yield {"type": "result", **output}

    async def _run_stream(self, job: Job) -> AsyncIterator[dict]:
        self.synthesis.log_request(job)
        warn_of_aggregate(job, self.ctx.config.stream_aggregate)
        items = 0
        async with aclosing(self.synthesis.chunks(job)) as parts:
            async for part in parts:
                if isinstance(part, Synthesized):
                    synthesized = part
                    continue
                for item in audio_items(part, items):
                    self.core.first_audio(job)
                    items += 1
                    yield item
        async with self.core.deadline(job):
            output = await self.synthesis.store(job, synthesized)
        yield {"type": "result", **output, "time_to_first_audio": round(job.first_audio_s or 0.0, 3),
               "audio_items": items}  # fmt: skip

    # ------------------------------------------------------------------ SERVER_MODE=http (server.http_server)

    async def speech(
        self, job_id: str, request: TTSRequest, *, stream: bool
    ) -> AsyncIterator[AudioChunk | SpeechResult]:
        """POST /v1/audio/speech: the audio of a request the HTTP layer has checked, nothing stored. With `stream`,
        its AudioChunks as they are made, then its SpeechResult (their samples joined); without, only the
        SpeechResult (Scheduler.submit: no streaming overhead). Logs, metrics and JOB_TIMEOUT_S as for a queue
        job. A failure is logged and counted here, then raised for the caller to answer; closing the generator
        early (the client went away) drops the request and counts it cancelled."""
        stopped = "request stopped after %.2f s (the client went away)"
        async with self.core.job(job_id, errors="raise", stopped=stopped) as job:
            job.request = request
            self.synthesis.log_request(job)
            parts = self._speech_stream(job) if stream else self._speech_whole(job)
            async with aclosing(parts):
                async for part in parts:
                    yield part
            job.log.info("[%s] ✓ success: total %.2f s", job.id, self.ctx.clock() - job.started)

    async def _speech_stream(self, job: Job) -> AsyncIterator[AudioChunk | SpeechResult]:
        async with aclosing(self.synthesis.chunks(job)) as parts:
            async for part in parts:
                if isinstance(part, Synthesized):
                    self.core.observe(job, part.result, part.generation_s)
                    yield part.result
                else:
                    self.core.first_audio(job)
                    yield part

    async def _speech_whole(self, job: Job) -> AsyncIterator[SpeechResult]:
        async with self.core.deadline(job):
            synthesized = await self.synthesis.synthesize(job)
        self.core.observe(job, synthesized.result, synthesized.generation_s)
        yield synthesized.result

    def refused(self, job_id: str, exc: Exception) -> dict:
        """A request refused before it became a job (HTTP mode checks OpenAI's body itself): logged and counted
        as an invalid job, as `__call__` does for a bad input. Returns its error output."""
        return self.core.refused(job_id, exc)


class LazyHandler:
    """A TTSHandler whose context is built on the first job, inside the event loop that runs the jobs.

    The RunPod SDK runs handlers in an event loop of its own (`asyncio.run` in JobScaler.start; uvicorn's loop
    under --rp_serve_api; another `asyncio.run` under --test_input). Anything bound to a loop (the scheduler's
    task, aiohttp sessions, asyncio events and locks) must therefore be created there, not before
    `runpod.serverless.start`. Load and warm the model before start; build the rest here. Concurrent first jobs
    wait for one build; a failed build answers that job with its error and is tried again by the next job.
    """

    def __init__(self, build: Callable[[], Awaitable[HandlerContext]]):
        self._build = build
        self._handler: TTSHandler | None = None
        self._lock: asyncio.Lock | None = None

    async def __call__(self, job: dict) -> dict:
        handler = await self._ready()
        return handler if isinstance(handler, dict) else await handler(job)

    async def stream(self, job: dict) -> AsyncIterator[dict]:
        handler = await self._ready()
        if isinstance(handler, dict):
            yield handler
            return
        async for item in handler.stream(job):
            yield item

    async def _ready(self) -> TTSHandler | dict:
        """The handler, built on the first call; or, when the build fails, the error output to answer with."""
        if self._handler is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._handler is None:
                    try:
                        self._handler = TTSHandler(await self._build())
                    except Exception as exc:
                        log.error("worker set-up failed: %s", type(exc).__name__, exc_info=exc)
                        return error_output(exc)
        return self._handler


def make_concurrency_modifier(max_concurrency: int) -> Callable[[int], int]:
    """The SDK's concurrency_modifier: always MAX_CONCURRENCY. It must be constant: when its answer changes, the
    SDK (JobScaler.set_scale) waits for every job in flight to finish before resizing, stalling the worker."""

    def concurrency_modifier(current: int) -> int:
        return max_concurrency

    return concurrency_modifier


def make_handler(
    context: HandlerContext | Callable[[], Awaitable[HandlerContext]], *, streaming: bool = False,
) -> Callable[[dict], Awaitable[dict]] | Callable[[dict], AsyncIterator[dict]]:
    """The function to pass as runpod.serverless.start({"handler": ...}). The SDK inspects it to tell generators
    from coroutines: a plain async function (one result per job), or with `streaming` an async generator function
    (STREAMING=on: items to RunPod's /stream, then the result; start the SDK with return_aggregate_stream=True).

    Pass a HandlerContext, or an async function that builds one on the first job (see LazyHandler: the way
    `python -m server` should do it, since the SDK runs jobs in an event loop it creates itself)."""
    handler = TTSHandler(context) if isinstance(context, HandlerContext) else LazyHandler(context)

    async def handle(job: dict) -> dict:
        return await handler(job)

    async def handle_stream(job: dict) -> AsyncIterator[dict]:
        async for item in handler.stream(job):
            yield item

    return handle_stream if streaming else handle
