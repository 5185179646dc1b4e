"""The steps of one job, whatever protocol brought it (server.jobs.Job carries it from step to step):

    log the request -> reference audio (storage.ReferenceCache: disk cache, single-flight download; pinned while
    the audio is made) -> synthesis (batching.Scheduler: latent cache, batched GPU decoding; `submit` for the
    whole result, `stream` for AudioChunks as they are vocoded) -> encode (thread) -> upload + signed URL
    (storage.store_result) -> the seed's output {"audio_url", "duration", "voice_id", "language",
    "generation_time", "parameters", ...}

A reference that does not decode is dropped from the cache, so the next job fetches it afresh. Logs, one line per
step, each with the job id: the text's start, voice, language, parameters, cache hits, times, the stored object's
name. Never a reference URL's query (signatures) nor a result's signed URL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batching import SamplingParams, SpeechRequest
from batching.streaming import AudioChunk
from storage import decode_reference_async, encode_async, store_result
from storage.errors import InvalidAudioError
from storage.urls import redact_url

if TYPE_CHECKING:
    from batching import SpeechResult
    from server.context import HandlerContext
    from server.jobs import Job, JobCore
    from storage.cache import CachedReference

TEXT_PREVIEW_CHARS = 60


@dataclass(frozen=True)
class Synthesized:
    """A finished synthesis: its reference (hit or not), its result, and how long it took."""

    reference: CachedReference
    result: SpeechResult
    generation_s: float


def preview(text: str) -> str:
    """The start of a caller's text for the log, on one line (server.logtext escapes what it still holds)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_PREVIEW_CHARS else flat[: TEXT_PREVIEW_CHARS - 3] + "..."


class Synthesis:
    """The steps, on a handler's context; the job's deadline and metrics are the core's."""

    def __init__(self, context: HandlerContext, core: JobCore):
        self.ctx = context
        self.core = core

    async def run(self, job: Job) -> dict:
        """A whole job: its reference, its audio, stored: the seed's output."""
        self.log_request(job)
        return await self.store(job, await self.synthesize(job))

    def log_request(self, job: Job) -> None:
        request = job.request
        params = request.parameters()
        job.log.info("[%s] === new request ===", job.id)
        job.log.info("[%s] text: %s (%d chars)", job.id, preview(request.gen_text), len(request.gen_text))
        job.log.info(
            "[%s] voice_id: %s | language: %s | format: %s | reference: %s",
            job.id, request.voice_id, request.language, request.output_format, redact_url(request.ref_audio_url),
        )  # fmt: skip
        job.log.info(
            "[%s] parameters: temp=%s, speed=%s, top_k=%s, top_p=%s, repetition_penalty=%s, seed=%s",
            job.id, params["temperature"], params["speed"], params["top_k"], params["top_p"],
            request.repetition_penalty, request.seed,
        )  # fmt: skip

    async def synthesize(self, job: Job) -> Synthesized:
        """Find or fetch the reference, then hand the job to the scheduler.

        The reference stays pinned for the whole synthesis (the `use()` block spans `submit`), so a full cache
        cannot evict the file before the scheduler decodes it, which it does only when the voice's latents are not
        cached. A file that does not decode is dropped from the cache: it is fetched afresh next time.
        """
        ctx, request = self.ctx, job.request
        t0 = ctx.clock()
        try:
            async with ctx.references.use(request.voice_id, request.ref_audio_url) as reference:
                self.note_reference(job, reference, ctx.clock() - t0)
                job.log.info("[%s] generating audio with XTTS v2...", job.id)
                t0 = ctx.clock()
                result = await ctx.scheduler.submit(self.speech_request(job, reference))
                return Synthesized(reference, result, ctx.clock() - t0)
        except InvalidAudioError:
            ctx.references.discard(request.voice_id, request.ref_audio_url)
            raise

    async def chunks(self, job: Job) -> AsyncIterator[AudioChunk | Synthesized]:
        """The reference (found or fetched, pinned while the audio is made), then the scheduler's stream: the
        AudioChunks as they come, then one Synthesized. Each await is under the job's deadline. Closing this
        generator early closes the scheduler's stream, which drops the request: its rows leave the batch at the
        next step."""
        ctx, request = self.ctx, job.request
        t0 = ctx.clock()
        async with AsyncExitStack() as stack:
            async with self.core.deadline(job):
                reference = await stack.enter_async_context(ctx.references.use(request.voice_id,
                                                                               request.ref_audio_url))
            self.note_reference(job, reference, ctx.clock() - t0)
            job.log.info("[%s] generating audio with XTTS v2 (streaming)...", job.id)
            t0 = ctx.clock()
            speech = dataclasses.replace(self.speech_request(job, reference), stream=True)
            result = None
            try:
                async with aclosing(ctx.scheduler.stream(speech)) as chunks:
                    async for chunk in self.core.in_time(job, chunks):
                        if isinstance(chunk, AudioChunk):
                            yield chunk
                        else:
                            result = chunk
            except InvalidAudioError:
                ctx.references.discard(request.voice_id, request.ref_audio_url)
                raise
            generation_s = ctx.clock() - t0
        yield Synthesized(reference, result, generation_s)

    async def store(self, job: Job, synthesized: Synthesized) -> dict:
        """Metrics and logs of a finished synthesis, then encode, upload, and the job's output."""
        ctx, metrics, request = self.ctx, self.ctx.metrics, job.request
        result, generation_s = synthesized.result, synthesized.generation_s
        self.core.observe(job, result, generation_s)

        t0 = ctx.clock()
        data, _content_type = await encode_async(result.wav, result.sample_rate, request.output_format)
        encode_s = ctx.clock() - t0
        job.log.info("[%s] uploading %d bytes of %s...", job.id, len(data), request.output_format)
        t0 = ctx.clock()
        stored = await store_result(ctx.storage, request.voice_id, data, request.output_format)
        upload_s = ctx.clock() - t0
        if metrics:
            metrics.observe_stage("encode", encode_s)
            metrics.observe_stage("upload", upload_s)
        job.log.info("[%s] upload done: %s (%.2f s)", job.id, stored.object_name, upload_s)

        total_s = ctx.clock() - job.started
        job.log.info("[%s] ✓ success: duration %.2f s, total %.2f s", job.id, result.duration_s, total_s)
        return {
            # The seed's response, field for field.
            "audio_url": stored.url,
            "duration": round(result.duration_s, 2),
            "voice_id": request.voice_id,
            "language": request.language,
            "generation_time": round(generation_s, 2),
            "parameters": request.parameters(),
            # Additions: what the worker did for this job.
            "output_format": request.output_format,
            "object_name": stored.object_name,
            "reference_cache_hit": synthesized.reference.hit,
            "latent_cache_hit": result.latent_cache_hit,
            "queue_wait": round(result.queue_wait_s, 3),
            "batch_size": max(result.batch_sizes, default=1),
            "segments": result.segments,
            "total_time": round(total_s, 2),
        }

    def note_reference(self, job: Job, reference: CachedReference, download_s: float) -> None:
        ctx, metrics = self.ctx, self.ctx.metrics
        if metrics:
            metrics.record_cache("reference_audio", reference.hit)
            metrics.cache_bytes.labels(cache="reference_audio").set(ctx.references.bytes)
            if not reference.hit:
                metrics.observe_stage("download", download_s)
        if reference.hit:
            job.log.info("[%s] reference audio in cache: %s (%d bytes)", job.id, job.request.voice_id, reference.size)
        else:
            job.log.info("[%s] reference audio downloaded: %d bytes in %.2f s", job.id, reference.size, download_s)

    def speech_request(self, job: Job, reference: CachedReference) -> SpeechRequest:
        """The scheduler's request: the text, the voice (keyed by the reference's content), the sampling, and the
        job's deadline on the scheduler's clock."""
        ctx, request = self.ctx, job.request

        async def load_reference():
            # Called by the scheduler only when the voice's latents are not cached.
            wav = await decode_reference_async(reference.path, ctx.reference_sample_rate, ctx.max_reference_s,
                                               min_level_dbfs=ctx.config.ref_min_level_dbfs)
            return wav, ctx.reference_sample_rate

        return SpeechRequest(
            text=request.gen_text,
            language=request.language,
            voice_key=reference.sha256[:64],  # the content, not the name: a new recording means new latents
            load_reference=load_reference,
            params=SamplingParams(
                temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                repetition_penalty=request.repetition_penalty, speed=request.speed, seed=request.seed,
            ),  # fmt: skip
            request_id=job.id,
            deadline=ctx.scheduler.clock() + max(0.0, job.deadline - ctx.clock()),
            on_progress=self._progress_reporter(job.raw) if ctx.progress else None,
        )

    def _progress_reporter(self, raw: dict) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if total > 1 and done < total:  # the result itself says the last one
                self.ctx.progress(raw, f"{done}/{total} segments generated")

        return report
