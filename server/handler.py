"""The async RunPod handler: one job from input to the seed's response.

    validate (server.validation) -> reference audio (storage.ReferenceCache: disk cache, single-flight download)
    -> synthesis (batching.Scheduler: latent cache, batched GPU decoding) -> encode (thread) -> upload + signed
    URL (storage.store_result) -> {"audio_url", "duration", "voice_id", "language", "generation_time",
    "parameters", ...}

The handler depends on what it calls, not on those classes: `HandlerContext` types its three seams as protocols
(`ResultStore` from storage.results, `ReferenceSource` and `SpeechScheduler` below), which the real classes and
the tests' stand-ins both satisfy.

STREAMING=on (`TTSHandler.stream`, an async generator): the same steps, but the audio leaves as it is made:

    validate -> reference -> Scheduler.stream: AudioChunks -> {"type": "audio", "index", "audio" (base64 of
    16-bit little-endian mono PCM), "encoding": "pcm_s16le", "sample_rate", "start", "duration"} items, each
    <= MAX_ITEM_S of audio (RunPod takes <= 1 MB per yield) -> encode + upload of the whole audio (the chunks
    joined: the same samples) -> {"type": "result", <the seed's output and additions>, "time_to_first_audio"}

A job with "stream": false yields only its result item. A failure before or during the stream yields
`{"error": "[code] message", ...}` as its last item: the SDK ends the job FAILED with that message, and nothing
was uploaded (the upload comes after the last chunk). JOB_TIMEOUT_S bounds the reference fetch and the upload
(never an await across a yield) and, through the request's deadline, the synthesis.

Every failure becomes `{"error", "error_code"[, "retryable"]}` through `server.validation.error_output`, the one
place that does so; the SDK marks such a job FAILED. A job RunPod stops (cancel, timeout) arrives here as a
CancelledError: it propagates into `Scheduler.submit`, which drops the request before it costs GPU time.

SERVER_MODE=http (server.http_server) uses the same steps: POST /tts is `__call__`; POST /v1/audio/speech is
`speech` (the audio as AudioChunks then the SpeechResult, or the SpeechResult alone; nothing stored), its
requests checked by server.openai_api (a refused one still logged and counted, through `refused`).

Logs, one line per step, each with the job id: the text's start, voice, language, parameters, cache hits,
times, the stored object's name. Never a reference URL's query (signatures) nor a result's signed URL.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from batching import InputError, SamplingParams, SpeechRequest
from batching.streaming import AudioChunk
from batching.errors import JobTimeoutError
from server.config import WorkerConfig
from server.metrics import Metrics
from server.validation import TTSRequest, ValidationError, error_output, validate_request
from storage import StorageInputError, decode_reference_async, encode_async, store_result
from storage.audio import pcm_s16le
from storage.errors import InvalidAudioError
from storage.urls import redact_url

if TYPE_CHECKING:
    from batching import SpeechResult
    from storage.cache import CachedReference
    from storage.results import ResultStore

log = logging.getLogger("server.handler")

TEXT_PREVIEW_CHARS = 60


class ReferenceSource(Protocol):
    """Reference audio by voice_id and URL, as a file on disk (storage.ReferenceCache)."""

    def use(self, voice_id: str, url: str) -> AbstractAsyncContextManager[CachedReference]:
        """The reference's file, found or fetched, kept (pinned) until the block ends."""
        ...

    def discard(self, voice_id: str, url: str) -> bool:
        """Forget the entry (a file that did not decode), so the next job fetches it afresh."""
        ...

    @property
    def bytes(self) -> int:
        """Bytes held on disk (a metric)."""
        ...


class SpeechScheduler(Protocol):
    """The GPU side (batching.Scheduler): a request in, its audio out; deadlines are on its `clock`."""

    clock: Callable[[], float]

    async def submit(self, request: SpeechRequest) -> SpeechResult: ...

    def stream(self, request: SpeechRequest) -> AsyncIterator[AudioChunk | SpeechResult]: ...


@dataclass
class HandlerContext:
    """What a handler needs, built once by `python -m server` after the engine is loaded and warm."""

    config: WorkerConfig
    storage: ResultStore  # where results go (storage.Storage)
    references: ReferenceSource  # storage.ReferenceCache
    scheduler: SpeechScheduler  # batching.Scheduler
    metrics: Metrics | None
    reference_sample_rate: int  # the engine's input rate (XTTS: 22050 Hz)
    max_reference_s: float  # the engine uses at most this much of a reference (XTTS: max_ref_len, 30 s)
    clock: Callable[[], float] = time.perf_counter
    # runpod.serverless.progress_update in RunPod's production loop; None elsewhere (the local test API has no
    # channel for it). Called with (job, message) as the segments of a multi-segment job finish.
    progress: Callable[[dict, str], None] | None = None


def _preview(text: str) -> str:
    """The start of a caller's text for the log, on one line (server.logtext escapes what it still holds)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_PREVIEW_CHARS else flat[: TEXT_PREVIEW_CHARS - 3] + "..."


def _is_client_error(exc: BaseException) -> bool:
    return isinstance(exc, ValidationError | StorageInputError | InputError)


class TTSHandler:
    """Callable as the RunPod handler: `await handler(job)` returns the job's output dict."""

    def __init__(self, context: HandlerContext):
        self.ctx = context

    async def __call__(self, job: dict) -> dict:
        job_id, jlog, started = self._begin(job)
        ctx = self.ctx
        language = "unknown"
        try:
            request = self._validate(job)
            language = request.language
            scope = asyncio.timeout(ctx.config.job_timeout_s)
            try:
                async with scope:
                    output = await self._run(job_id, request, jlog, started, job)
            except TimeoutError:
                if not scope.expired():
                    raise  # a timeout from inside (storage, engine): handled below like any error
                raise JobTimeoutError(
                    f"job did not finish within JOB_TIMEOUT_S={ctx.config.job_timeout_s:g} s"
                ) from None
            self._record("completed", language, started)
            return output
        except asyncio.CancelledError:
            # RunPod stopped the job (cancel or its own timeout): nothing is returned to anyone.
            jlog.info("[%s] job stopped by RunPod after %.2f s", job_id, ctx.clock() - started)
            self._record("cancelled", language, started)
            raise
        except Exception as exc:  # every other failure becomes an error output, here and nowhere else
            return self._fail(job_id, jlog, exc, language, started)
        finally:
            if ctx.metrics:
                ctx.metrics.jobs_in_flight.dec()

    def _begin(self, job: dict) -> tuple[str, logging.LoggerAdapter, float]:
        """A job's id, its logger and its start time; the in-flight gauge counts it (the caller's `finally` lets
        it go)."""
        job_id = str(job.get("id", "-")) if isinstance(job, dict) else "-"
        if self.ctx.metrics:
            self.ctx.metrics.jobs_in_flight.inc()
        return job_id, logging.LoggerAdapter(log, {"job_id": job_id}), self.ctx.clock()

    def _validate(self, job: dict) -> TTSRequest:
        config = self.ctx.config
        return validate_request(
            job.get("input") if isinstance(job, dict) else None, max_text_chars=config.max_text_chars,
            default_language=config.default_language, default_output_format=config.default_output_format,
        )  # fmt: skip

    async def stream(self, job: dict) -> AsyncIterator[dict]:
        """STREAMING=on: the job's audio items as they are made, then its result item; a failure is yielded as
        `{"error": "[code] message", ...}`, which the SDK turns into a FAILED job with that message."""
        job_id, jlog, started = self._begin(job)
        ctx = self.ctx
        language = "unknown"
        try:
            try:
                request = self._validate(job)
                language = request.language
                if request.stream:
                    items = self._run_stream(job_id, request, jlog, started, job)
                else:
                    items = self._result_only(job_id, request, jlog, started, job)
                async with aclosing(items):
                    async for item in items:
                        yield item
            except (asyncio.CancelledError, GeneratorExit):
                jlog.info("[%s] job stopped after %.2f s", job_id, ctx.clock() - started)
                self._record("cancelled", language, started)
                raise
            except Exception as exc:  # every other failure: an error item, here and nowhere else
                yield self._fail(job_id, jlog, exc, language, started)
                return
            self._record("completed", language, started)
        finally:
            if ctx.metrics:
                ctx.metrics.jobs_in_flight.dec()

    async def _result_only(self, job_id, request, jlog, started, job) -> AsyncIterator[dict]:
        """A job that asked for no stream ("stream": false): only its result item."""
        async with self._deadline(started):
            output = await self._run(job_id, request, jlog, started, job)
        yield {"type": "result", **output}

    async def _run_stream(
        self, job_id: str, request: TTSRequest, jlog: logging.LoggerAdapter, started: float, job: dict
    ) -> AsyncIterator[dict]:
        self._log_request(job_id, request, jlog)
        self._warn_of_aggregate(job_id, jlog, request)
        first_audio_s = None
        items = 0
        async with aclosing(self._chunks(job_id, request, jlog, started, job)) as parts:
            async for part in parts:
                if isinstance(part, _Synthesis):
                    synthesis = part
                    continue
                for item in audio_items(part, items):
                    if first_audio_s is None:
                        first_audio_s = self._first_audio(job_id, jlog, started)
                    items += 1
                    yield item
        async with self._deadline(started):
            output = await self._store(job_id, request, jlog, started, synthesis.reference, synthesis.result,
                                       synthesis.generation_s)  # fmt: skip
        yield {"type": "result", **output, "time_to_first_audio": round(first_audio_s or 0.0, 3),
               "audio_items": items}  # fmt: skip

    async def _chunks(
        self, job_id: str, request: TTSRequest, jlog: logging.LoggerAdapter, started: float, job: dict
    ) -> AsyncIterator[AudioChunk | _Synthesis]:
        """The reference (found or fetched, pinned while the audio is made), then the scheduler's stream: the
        AudioChunks as they come, then one _Synthesis. Closing this generator early closes the scheduler's stream,
        which drops the request: its rows leave the batch at the next step."""
        ctx = self.ctx
        t0 = ctx.clock()
        async with AsyncExitStack() as stack:
            async with self._deadline(started):
                reference = await stack.enter_async_context(ctx.references.use(request.voice_id,
                                                                               request.ref_audio_url))
            self._note_reference(job_id, jlog, request.voice_id, reference, ctx.clock() - t0)
            jlog.info("[%s] generating audio with XTTS v2 (streaming)...", job_id)
            t0 = ctx.clock()
            speech = dataclasses.replace(self._speech_request(job_id, request, reference, started, job), stream=True)
            result = None
            try:
                async with aclosing(ctx.scheduler.stream(speech)) as chunks:
                    async for chunk in self._in_time(chunks, started):
                        if isinstance(chunk, AudioChunk):
                            yield chunk
                        else:
                            result = chunk
            except InvalidAudioError:
                ctx.references.discard(request.voice_id, request.ref_audio_url)
                raise
            generation_s = ctx.clock() - t0
        yield _Synthesis(reference, result, generation_s)

    def _warn_of_aggregate(self, job_id: str, jlog: logging.LoggerAdapter, request: TTSRequest) -> None:
        """STREAM_AGGREGATE=on: the SDK's job-done POST carries every item again (AGGREGATE_BYTES_PER_S): say so
        before a job whose audio, estimated from its text, would take it past RunPod's 10 MB /run cap."""
        if not self.ctx.config.stream_aggregate:
            return
        from batching.scheduler import SPOKEN_CHARS_PER_S  # loaded already: the scheduler runs the job

        audio_s = len(request.gen_text) / SPOKEN_CHARS_PER_S / request.speed
        estimate = audio_s * AGGREGATE_BYTES_PER_S
        if estimate > RUNPOD_RUN_CAP_BYTES:
            jlog.warning(
                "[%s] about %.0f s of audio: its job-done POST will carry about %.1f MB of streamed items, over "
                "RunPod's %d MB cap for /run (20 MB for /runsync); callers that read /stream only should run this "
                "worker with STREAM_AGGREGATE=off", job_id, audio_s, estimate / 1e6, RUNPOD_RUN_CAP_BYTES // 10**6,
            )  # fmt: skip

    async def _in_time(self, items: AsyncIterator, started: float) -> AsyncIterator:
        """`items`, each awaited under the job's deadline (JOB_TIMEOUT_S; never across a yield, so a slow reader's
        time is not the job's): a stream that stalls past it ends with JobTimeoutError at the deadline itself,
        not when the scheduler next looks at its rows."""
        while True:
            async with self._deadline(started):
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
            yield item

    def _first_audio(self, job_id: str, jlog: logging.LoggerAdapter, started: float) -> float:
        """A streamed job's first audio leaves now: its time, observed and logged."""
        first_audio_s = self.ctx.clock() - started
        if self.ctx.metrics:
            self.ctx.metrics.time_to_first_audio.observe(first_audio_s)
        jlog.info("[%s] first audio after %.2f s", job_id, first_audio_s)
        return first_audio_s

    # ------------------------------------------------------------------ SERVER_MODE=http (server.http_server)

    async def speech(
        self, job_id: str, request: TTSRequest, *, stream: bool
    ) -> AsyncIterator[AudioChunk | SpeechResult]:
        """POST /v1/audio/speech: the audio of a request the HTTP layer has checked, nothing stored. With `stream`,
        its AudioChunks as they are made, then its SpeechResult (their samples joined); without, only the
        SpeechResult (Scheduler.submit: no streaming overhead). Logs, metrics and JOB_TIMEOUT_S as for a queue
        job. A failure is logged and counted here, then raised for the caller to answer; closing the generator
        early (the client went away) drops the request and counts it cancelled."""
        job_id, jlog, started = self._begin({"id": job_id})
        try:
            self._log_request(job_id, request, jlog)
            if stream:
                first_audio_s = None
                async with aclosing(self._chunks(job_id, request, jlog, started, {})) as parts:
                    async for part in parts:
                        if isinstance(part, _Synthesis):
                            self._observe(job_id, jlog, part.result, part.generation_s)
                            yield part.result
                        else:
                            if first_audio_s is None:
                                first_audio_s = self._first_audio(job_id, jlog, started)
                            yield part
            else:
                async with self._deadline(started):
                    _, result, generation_s = await self._synthesize(job_id, request, jlog, started, {})
                self._observe(job_id, jlog, result, generation_s)
                yield result
        except (asyncio.CancelledError, GeneratorExit):
            jlog.info("[%s] request stopped after %.2f s (the client went away)", job_id, self.ctx.clock() - started)
            self._record("cancelled", request.language, started)
            raise
        except Exception as exc:
            self._fail(job_id, jlog, exc, request.language, started)
            raise
        else:
            jlog.info("[%s] ✓ success: total %.2f s", job_id, self.ctx.clock() - started)
            self._record("completed", request.language, started)
        finally:
            if self.ctx.metrics:
                self.ctx.metrics.jobs_in_flight.dec()

    def refused(self, job_id: str, exc: Exception) -> dict:
        """A request refused before it became a job (HTTP mode checks OpenAI's body itself): logged and counted
        as an invalid job, as `__call__` does for a bad input. Returns its error output."""
        return self._fail(job_id, logging.LoggerAdapter(log, {"job_id": job_id}), exc, "unknown", self.ctx.clock())

    def _deadline(self, started: float) -> AbstractAsyncContextManager:
        """JOB_TIMEOUT_S around one await of a streamed job (never around a yield): JobTimeoutError past it."""
        return _JobDeadline(self.ctx.config.job_timeout_s, self.ctx.config.job_timeout_s - (self.ctx.clock() - started))

    async def _run(
        self, job_id: str, request: TTSRequest, jlog: logging.LoggerAdapter, started: float, job: dict
    ) -> dict:
        self._log_request(job_id, request, jlog)
        reference, result, generation_s = await self._synthesize(job_id, request, jlog, started, job)
        return await self._store(job_id, request, jlog, started, reference, result, generation_s)

    def _log_request(self, job_id: str, request: TTSRequest, jlog: logging.LoggerAdapter) -> None:
        params = request.parameters()
        jlog.info("[%s] === new request ===", job_id)
        jlog.info("[%s] text: %s (%d chars)", job_id, _preview(request.gen_text), len(request.gen_text))
        jlog.info(
            "[%s] voice_id: %s | language: %s | format: %s | reference: %s",
            job_id, request.voice_id, request.language, request.output_format, redact_url(request.ref_audio_url),
        )  # fmt: skip
        jlog.info(
            "[%s] parameters: temp=%s, speed=%s, top_k=%s, top_p=%s, repetition_penalty=%s, seed=%s",
            job_id, params["temperature"], params["speed"], params["top_k"], params["top_p"],
            request.repetition_penalty, request.seed,
        )  # fmt: skip

    async def _store(
        self, job_id: str, request: TTSRequest, jlog: logging.LoggerAdapter, started: float,
        reference: CachedReference, result: SpeechResult, generation_s: float,
    ) -> dict:  # fmt: skip
        """Metrics and logs of a finished synthesis, then encode, upload, and the job's output."""
        ctx, metrics = self.ctx, self.ctx.metrics
        params = request.parameters()
        self._observe(job_id, jlog, result, generation_s)

        t0 = ctx.clock()
        data, _content_type = await encode_async(result.wav, result.sample_rate, request.output_format)
        encode_s = ctx.clock() - t0
        jlog.info("[%s] uploading %d bytes of %s...", job_id, len(data), request.output_format)
        t0 = ctx.clock()
        stored = await store_result(ctx.storage, request.voice_id, data, request.output_format)
        upload_s = ctx.clock() - t0
        if metrics:
            metrics.observe_stage("encode", encode_s)
            metrics.observe_stage("upload", upload_s)
        jlog.info("[%s] upload done: %s (%.2f s)", job_id, stored.object_name, upload_s)

        total_s = ctx.clock() - started
        jlog.info("[%s] ✓ success: duration %.2f s, total %.2f s", job_id, result.duration_s, total_s)
        return {
            # The seed's response, field for field.
            "audio_url": stored.url,
            "duration": round(result.duration_s, 2),
            "voice_id": request.voice_id,
            "language": request.language,
            "generation_time": round(generation_s, 2),
            "parameters": params,
            # Additions: what the worker did for this job.
            "output_format": request.output_format,
            "object_name": stored.object_name,
            "reference_cache_hit": reference.hit,
            "latent_cache_hit": result.latent_cache_hit,
            "queue_wait": round(result.queue_wait_s, 3),
            "batch_size": max(result.batch_sizes, default=1),
            "segments": result.segments,
            "total_time": round(total_s, 2),
        }

    def _observe(self, job_id: str, jlog: logging.LoggerAdapter, result: SpeechResult, generation_s: float) -> None:
        """Metrics and log line of a finished synthesis."""
        if self.ctx.metrics:
            self.ctx.metrics.observe_stage("queue_wait", result.queue_wait_s)
            self.ctx.metrics.observe_stage("generation", result.engine_s)
            self.ctx.metrics.record_audio(result.duration_s, result.engine_s)
        jlog.info(
            "[%s] audio generated in %.2f s: %.2f s of audio (queue %.2f s, conditioning %.2f s, latents %s, "
            "batch sizes %s)",
            job_id, generation_s, result.duration_s, result.queue_wait_s, result.conditioning_s,
            "cached" if result.latent_cache_hit else "computed", list(result.batch_sizes),
        )  # fmt: skip

    async def _synthesize(
        self, job_id: str, request: TTSRequest, jlog: logging.LoggerAdapter, started: float, job: dict
    ) -> tuple[CachedReference, SpeechResult, float]:
        """Find or fetch the reference, then hand the job to the scheduler: (reference, result, seconds it took).

        The reference stays pinned for the whole synthesis (the `use()` block spans `submit`), so a full cache
        cannot evict the file before the scheduler decodes it, which it does only when the voice's latents are not
        cached. A file that does not decode is dropped from the cache: it is fetched afresh next time.
        """
        ctx = self.ctx
        t0 = ctx.clock()
        try:
            async with ctx.references.use(request.voice_id, request.ref_audio_url) as reference:
                self._note_reference(job_id, jlog, request.voice_id, reference, ctx.clock() - t0)
                jlog.info("[%s] generating audio with XTTS v2...", job_id)
                t0 = ctx.clock()
                result = await ctx.scheduler.submit(self._speech_request(job_id, request, reference, started, job))
                return reference, result, ctx.clock() - t0
        except InvalidAudioError:
            ctx.references.discard(request.voice_id, request.ref_audio_url)
            raise

    def _note_reference(
        self, job_id: str, jlog: logging.LoggerAdapter, voice_id: str, reference: CachedReference, download_s: float
    ) -> None:
        ctx, metrics = self.ctx, self.ctx.metrics
        if metrics:
            metrics.record_cache("reference_audio", reference.hit)
            metrics.cache_bytes.labels(cache="reference_audio").set(ctx.references.bytes)
            if not reference.hit:
                metrics.observe_stage("download", download_s)
        if reference.hit:
            jlog.info("[%s] reference audio in cache: %s (%d bytes)", job_id, voice_id, reference.size)
        else:
            jlog.info("[%s] reference audio downloaded: %d bytes in %.2f s", job_id, reference.size, download_s)

    def _speech_request(
        self, job_id: str, request: TTSRequest, reference: CachedReference, started: float, job: dict
    ) -> SpeechRequest:
        ctx = self.ctx

        async def load_reference():
            # Called by the scheduler only when the voice's latents are not cached.
            wav = await decode_reference_async(reference.path, ctx.reference_sample_rate, ctx.max_reference_s,
                                               min_level_dbfs=ctx.config.ref_min_level_dbfs)
            return wav, ctx.reference_sample_rate

        remaining_s = ctx.config.job_timeout_s - (ctx.clock() - started)
        return SpeechRequest(
            text=request.gen_text,
            language=request.language,
            voice_key=reference.sha256[:64],  # the content, not the name: a new recording means new latents
            load_reference=load_reference,
            params=SamplingParams(
                temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                repetition_penalty=request.repetition_penalty, speed=request.speed, seed=request.seed,
            ),  # fmt: skip
            request_id=job_id,
            deadline=ctx.scheduler.clock() + max(0.0, remaining_s),
            on_progress=self._progress_reporter(job) if ctx.progress else None,
        )

    def _progress_reporter(self, job: dict) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if total > 1 and done < total:  # the result itself says the last one
                self.ctx.progress(job, f"{done}/{total} segments generated")

        return report

    def _fail(
        self, job_id: str, jlog: logging.LoggerAdapter, exc: BaseException, language: str, started: float
    ) -> dict:
        output = error_output(exc)
        client = _is_client_error(exc)
        if hasattr(exc, "error_code"):
            jlog.warning("[%s] ✗ %s", job_id, output["error"])  # the message starts with "[code]"
        else:
            jlog.error("[%s] ✗ unexpected %s", job_id, type(exc).__name__, exc_info=exc)
        self._record("invalid" if client else "failed", language, started)
        return output

    def _record(self, status: str, language: str, started: float) -> None:
        if self.ctx.metrics:
            self.ctx.metrics.record_job(status, language, self.ctx.clock() - started)


@dataclass(frozen=True)
class _Synthesis:
    """The end of a streamed synthesis: its reference (hit or not), its result, and how long it took."""

    reference: CachedReference
    result: SpeechResult
    generation_s: float


class _JobDeadline:
    """asyncio.timeout that raises JobTimeoutError (naming JOB_TIMEOUT_S) when it is its own deadline that passed."""

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


# STREAM_AGGREGATE=on: the job-done POST carries every streamed item again. Its size against the audio's length,
# measured through the real SDK loop (tests/reliability/test_streaming_in_the_loop.py): base64 of 16-bit PCM at
# 24 kHz is 64,000 bytes a second, plus each item's JSON keys.
AGGREGATE_BYTES_PER_S = 64_200
RUNPOD_RUN_CAP_BYTES = 10 * 10**6  # RunPod's documented payload cap of /run (/runsync: 20 MB)

# Audio items: 16-bit PCM, at most this much audio each, so that every stream POST stays well under RunPod's
# 1 MB per yield (10 s at 24 kHz: 480 KB of PCM, 640 KB of base64).
MAX_ITEM_S = 10.0


def audio_items(chunk: AudioChunk, first_index: int) -> list[dict]:
    """A chunk of a streamed job's audio as stream items (split when longer than MAX_ITEM_S)."""
    sr = chunk.sample_rate
    step = int(MAX_ITEM_S * sr)
    items = []
    for n, lo in enumerate(range(0, len(chunk.samples), step)):
        part = chunk.samples[lo : lo + step]
        items.append({
            "type": "audio",
            "index": first_index + n,
            "audio": base64.b64encode(pcm_s16le(part)).decode("ascii"),
            "encoding": "pcm_s16le",
            "sample_rate": sr,
            "start": round((chunk.start + lo) / sr, 6),
            "duration": round(len(part) / sr, 6),
        })  # fmt: skip
    return items


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
