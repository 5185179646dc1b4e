"""The GPU scheduler: one asyncio task owns the queue of waiting segments; one thread owns the model.

    handler ──submit(request)──▶ text split + voice latents (LatentCache) ──▶ waiting segments
    scheduler task: policy.next_batch(waiting, now) ──▶ engine thread: engine.generate(rows)
                    ──▶ each request's segments re-joined in order ──▶ its future resolves

- A request whose caller went away (its task cancelled) or whose deadline passed is dropped before its
  segments cost GPU time.
- One bad row never fails the others: a failing batch is split in halves and each half retried, down to the
  row that fails; an out-of-memory batch is halved the same way. A row whose audio is not finite fails alone.
- A fatal device error (a CUDA error) fails every request in hand and calls `on_fatal`, which should make the
  worker exit so the platform replaces it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from batching import policy
from batching.engine import SamplingParams, Segment, SegmentAudio, TextSegment, VoiceLatents, join_segments
from batching.errors import BatchError, EngineError, FatalEngineError, OutOfMemoryError
from batching.latents import LatentCache

log = logging.getLogger(__name__)


class JobTimeoutError(EngineError):
    error_code = "job_timeout"
    retryable = True


class SchedulerClosedError(EngineError):
    error_code = "worker_shutting_down"
    retryable = True


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    language: str
    voice_key: str  # changes when the reference audio changes (its content hash)
    load_reference: Callable[[], Awaitable[tuple[np.ndarray, int]]]  # (mono float32, sample rate)
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    deadline: float | None = None  # on the scheduler's clock
    on_progress: Callable[[int, int], None] | None = None  # (segments done, segments total)


@dataclass(frozen=True)
class SynthesisResult:
    wav: np.ndarray
    sample_rate: int
    duration_s: float
    segments: int
    queue_wait_s: float  # submit -> first batch with one of its rows starts
    engine_s: float  # time in batches that carried its rows
    conditioning_s: float  # 0 when the latents were cached
    latent_cache_hit: bool
    batch_sizes: tuple[int, ...]


class Observer:
    """Hooks for metrics; the default does nothing. Called on the event loop."""

    def batch_done(self, size: int, seconds: float, tokens: int) -> None: ...
    def queue_depth(self, segments: int) -> None: ...
    def conditioning_done(self, seconds: float, hit: bool) -> None: ...
    def rows_failed(self, count: int, error: BaseException) -> None: ...
    def vocoder_done(self, seconds: float) -> None: ...


class _Request:
    def __init__(self, req: SynthesisRequest, segments: list[TextSegment], voice: VoiceLatents, now: float):
        self.req = req
        self.voice = voice
        self.texts = segments
        self.audio: list[SegmentAudio | None] = [None] * len(segments)
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submitted_at = now  # when its segments joined the queue (after text preparation and latents)
        self.first_batch_at: float | None = None
        self.engine_s = 0.0
        self.batch_sizes: list[int] = []
        self.conditioning_s = 0.0
        self.latent_hit = False

    @property
    def finished(self) -> bool:
        return self.future.done()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(frozen=True, eq=False)
class _Row:
    request: _Request
    index: int
    order: int


class Scheduler:
    def __init__(
        self,
        engine,
        latents: LatentCache,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.015,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"MAX_BATCH_SIZE must be an integer >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"BATCH_WAIT_MS must be >= 0, got {batch_wait_s * 1000:g}")
        self.engine = engine
        self.latents = latents
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.observer = observer or Observer()
        self.on_fatal = on_fatal
        self._waiting: dict[_Row, policy.Waiting] = {}
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closed = False
        self._busy = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        """Stop taking requests, fail those still waiting, stop the loop and the engine thread."""
        self._closed = True
        for row in list(self._waiting):
            row.request.fail(SchedulerClosedError("the worker is shutting down; retry the job"))
        self._waiting.clear()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    def poke(self) -> None:
        """Make the loop look at the queue again now (tests that move the clock by hand call this)."""
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._busy

    async def run_on_engine(self, fn, *args):
        """Run `fn(*args)` on the engine thread (the only thread that may touch the model)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ---------------------------------------------------------------- the handler-facing call

    async def submit(self, req: SynthesisRequest) -> SynthesisResult:
        if self._closed:
            raise SchedulerClosedError("the worker is shutting down; retry the job")
        segments = await asyncio.to_thread(self.engine.prepare_text, req.text, req.language)
        t0 = time.perf_counter()
        voice, hit = await self.latents.get(req.voice_key, lambda: self._condition(req))
        request = _Request(req, segments, voice, self.clock())
        request.latent_hit = hit
        request.conditioning_s = 0.0 if hit else time.perf_counter() - t0
        self.observer.conditioning_done(request.conditioning_s, hit)
        if self._closed:
            raise SchedulerClosedError("the worker is shutting down; retry the job")
        now = self.clock()
        for i, seg in enumerate(segments):
            row = _Row(request, i, next(self._order))
            self._waiting[row] = policy.Waiting(row, req.voice_key, len(seg.tokens), now, row.order)
        self.observer.queue_depth(len(self._waiting))
        self._wake.set()
        try:
            # shield: a cancelled caller must not cancel the future the scheduler resolves; it is dropped instead.
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            request.future.cancel()
            self._drop(request)
            raise

    async def _condition(self, req: SynthesisRequest) -> VoiceLatents:
        wav, sr = await req.load_reference()
        return await self.run_on_engine(self.engine.condition, wav, sr)

    def _drop(self, request: _Request) -> None:
        for row in [r for r in self._waiting if r.request is request]:
            del self._waiting[row]
        self.observer.queue_depth(len(self._waiting))

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while True:
            self._expire()
            decision = policy.next_batch(
                list(self._waiting.values()), self.clock(),
                max_batch_size=self.max_batch_size, batch_wait_s=self.batch_wait_s,
            )  # fmt: skip
            if isinstance(decision, policy.Idle):
                await self._sleep(None)
            elif isinstance(decision, policy.WaitUntil):
                await self._sleep(max(0.0, decision.deadline - self.clock()))
            else:
                rows = [key for key in decision.keys]
                for row in rows:
                    del self._waiting[row]
                self.observer.queue_depth(len(self._waiting))
                rows = [r for r in rows if not r.request.finished]
                if rows:
                    self._busy = True
                    try:
                        await self._run_rows(rows)
                    finally:
                        self._busy = False

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    def _expire(self) -> None:
        now = self.clock()
        for request in {r.request for r in self._waiting}:
            deadline = request.req.deadline
            if deadline is not None and now >= deadline:
                request.fail(JobTimeoutError(f"job timed out after waiting {now - request.submitted_at:.1f} s"))
                self._drop(request)

    async def _run_rows(self, rows: list[_Row]) -> None:
        """Run rows as one batch; on failure, split in halves and retry each, so only failing rows fail."""
        started = self.clock()
        for row in rows:
            if row.request.first_batch_at is None:
                row.request.first_batch_at = started
        segments = [Segment(r.request.texts[r.index].tokens, len(r.request.texts[r.index].text), r.request.voice,
                            r.request.req.params) for r in rows]  # fmt: skip
        t0 = time.perf_counter()
        try:
            audio = await self.run_on_engine(self.engine.generate, segments)
            if len(audio) != len(rows):
                raise BatchError(f"engine returned {len(audio)} results for {len(rows)} rows")
        except Exception as exc:
            error = _classify(exc)
            if isinstance(error, FatalEngineError):
                self._fatal(error, rows)
                return
            if len(rows) == 1:
                log.warning("request %s: segment %d failed: %s", rows[0].request.req.request_id, rows[0].index, exc)
                self.observer.rows_failed(1, error)
                rows[0].request.fail(error)
                return
            half = len(rows) // 2
            log.warning("batch of %d failed (%s: %s); retrying in halves", len(rows), type(exc).__name__, exc)
            for part in (rows[:half], rows[half:]):
                part = [r for r in part if not r.request.finished]
                if part:
                    await self._run_rows(part)
            return
        elapsed = time.perf_counter() - t0
        self.observer.batch_done(len(rows), elapsed, sum(len(a.codes) for a in audio))
        vocoder_s = getattr(self.engine, "last_vocoder_s", None)
        if vocoder_s is not None:
            self.observer.vocoder_done(vocoder_s)
        for row, result in zip(rows, audio, strict=True):
            request = row.request
            if request.finished:
                continue
            if not np.isfinite(result.wav).all():
                self.observer.rows_failed(1, BatchError("non-finite audio"))
                request.fail(BatchError("generation produced non-finite audio (NaN or inf) for this segment"))
                continue
            request.engine_s += elapsed
            request.batch_sizes.append(len(rows))
            request.audio[row.index] = result
            done = sum(a is not None for a in request.audio)
            if request.req.on_progress:
                try:
                    request.req.on_progress(done, len(request.audio))
                except Exception:  # a progress hook must never fail the job
                    log.exception("progress callback failed")
            if done == len(request.audio):
                self._complete(request)

    def _complete(self, request: _Request) -> None:
        wav = join_segments([a.wav for a in request.audio], self.engine.sample_rate)
        sr = self.engine.sample_rate
        request.future.set_result(
            SynthesisResult(
                wav=wav,
                sample_rate=sr,
                duration_s=len(wav) / sr,
                segments=len(request.audio),
                queue_wait_s=(request.first_batch_at or request.submitted_at) - request.submitted_at,
                engine_s=request.engine_s,
                conditioning_s=request.conditioning_s,
                latent_cache_hit=request.latent_hit,
                batch_sizes=tuple(request.batch_sizes),
            )
        )

    def _fatal(self, error: FatalEngineError, rows: list[_Row]) -> None:
        log.critical("fatal engine error: %s", error)
        for row in rows:
            row.request.fail(error)
        for row in list(self._waiting):
            row.request.fail(error)
        self._waiting.clear()
        self._closed = True
        if self.on_fatal:
            self.on_fatal(error)


def _classify(exc: BaseException) -> EngineError:
    """Map an exception from the engine thread to the error the scheduler acts on."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OutOfMemoryError(f"the batch did not fit in GPU memory: {exc}")
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text or "cuDNN error" in text):
        return FatalEngineError(f"the GPU is in an unusable state: {text}")
    return BatchError(f"generation failed: {type(exc).__name__}: {text}")
