"""The static loop (SCHEDULING=static, and engines without the step-level calls): policy.next_batch forms a batch
that runs to completion (engine.generate), then the next; and the delivery of a segment's audio to its request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np

from batching import policy
from batching.audio import join_segments
from batching.engine import Segment, SegmentAudio
from batching.errors import BatchError, FatalEngineError
from batching.failures import classify as _classify
from batching.records import SpeechResult, _Request, _Row

log = logging.getLogger("batching.scheduler")


class _StaticLoop:
    async def _run(self) -> None:
        while True:
            self._expire()
            decision = policy.next_batch(
                self._admissible(), self.clock(),
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

    async def _run_rows(self, rows: list[_Row]) -> None:
        """Run rows as one batch; on failure, split in halves and retry each, so only failing rows fail."""
        started = self.clock()
        self.observer.rows_admitted(len(rows))
        for row in rows:
            if row.request.first_batch_at is None:
                row.request.first_batch_at = started
        segments = [self._segment(r) for r in rows]
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
            self._deliver(row, result, elapsed, len(rows))

    def _deliver(self, row: _Row, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        """One segment's whole audio: checked, stored (a streamed request's joiner gets what its spans have not
        given yet), progress reported, the request completed when it was the last."""
        request = row.request
        if request.finished:
            return
        if not np.isfinite(result.wav).all():
            self.observer.rows_failed(1, BatchError("non-finite audio"))
            request.fail(BatchError("generation produced non-finite audio (NaN or inf) for this segment"))
            return
        if request.streamed:
            self._give(request, row.index, result.wav[request.joiner.received(row.index):], ended=True)
            result = SegmentAudio(result.codes, np.zeros(0, dtype=np.float32))  # the joiner holds the audio
        self._segment_done(row, result, engine_s, batch_size)

    def _give(self, request: _Request, index: int, samples: np.ndarray, ended: bool) -> None:
        chunk = request.joiner.add(index, samples, ended)
        if chunk is not None:
            request.unread_s += len(chunk.samples) / chunk.sample_rate
            request.chunks.put_nowait(chunk)

    def _segment_done(self, row: _Row, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        request = row.request
        request.engine_s += engine_s
        request.batch_sizes.append(batch_size)
        request.audio[row.index] = result
        done = sum(a is not None for a in request.audio)
        if request.req.on_progress:
            try:
                request.req.on_progress(done, len(request.audio))
            except Exception:  # a progress hook must never fail the job
                log.exception("progress callback failed")
        if done == len(request.audio):
            self._complete(request)

    @staticmethod
    def _segment(row: _Row) -> Segment:
        text = row.request.texts[row.index]
        params = row.request.req.params
        if params.seed is None:
            params = dataclasses.replace(params, seed=row.seed)
        return Segment(text.tokens, len(text.text), row.request.voice, params)

    def _complete(self, request: _Request) -> None:
        if request.streamed:
            wav = request.joiner.audio()  # exactly the chunks given out
        else:
            wav = join_segments([a.wav for a in request.audio], self.engine.sample_rate)
        sr = self.engine.sample_rate
        request.future.set_result(
            SpeechResult(
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
        if request.streamed:
            request.chunks.put_nowait(request.future.result())
