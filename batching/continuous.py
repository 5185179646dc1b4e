"""The continuous core: at every step boundary, evict, admit, one decoding step and the vocoder's work."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from batching import policy
from batching.engine import SegmentAudio
from batching.errors import BatchError, FatalEngineError, OutOfMemoryError
from batching.failures import classify as _classify
from batching.records import PREEMPT_MIN_LEAD_S, _Row
from batching.running import StepOutput
from batching.spans import _RUNNING_ORDER, _Span

log = logging.getLogger("batching.scheduler")


class _ContinuousCore:
    async def _run_continuous(self) -> None:
        try:
            await self._continuous_loop()
        except Exception as exc:  # a bug here must not leave every job waiting forever: fail them, then exit
            log.exception("the scheduler loop failed")
            self._fatal(FatalEngineError(f"the scheduler failed: {type(exc).__name__}: {exc}"),
                        list(self._waiting))  # fmt: skip

    async def _continuous_loop(self) -> None:
        while True:
            self._expire()
            gone = [r for r in self._running if r.request.finished]
            for row in gone:
                del self._running[row]
                self._row_peak.pop(row, None)
            if gone:
                self.observer.rows_evicted(len(self._running))
            for row in [r for r in self._finished if r.request.finished]:
                del self._finished[row]
            self._oom_rows = {r for r in self._oom_rows if r in self._waiting or r in self._running}
            if not self._running and not self._oom_rows:  # the batch has drained since the last OOM: full budgets
                self._row_cap, self._kv_cap = self.max_batch_size, self.max_batch_tokens
            gone += self._preempt()  # evicted from the engine like rows that left; they wait again
            decision = policy.next_admission(
                self._admissible(), self.clock(),
                running_rows=len(self._running), running_span=max(self._running.values(), default=0),
                max_rows=self._row_cap, max_positions=self._kv_cap, batch_wait_s=self.batch_wait_s,
            )  # fmt: skip
            admit: list[_Row] = []
            if isinstance(decision, policy.Batch) and decision.keys:
                for row in decision.keys:
                    reservation = self._waiting.pop(row).positions
                    if not row.request.finished:
                        admit.append(row)
                        self._running[row] = reservation
                self.observer.queue_depth(len(self._waiting))
            if not self._running and not self._finished and not gone:
                if isinstance(decision, policy.Idle):
                    if self._vocoded and hasattr(self.engine, "release_memory"):
                        self._vocoded = False
                        await self.run_on_engine(self.engine.release_memory)
                        continue  # the world may have changed while the engine thread trimmed
                    await self._sleep(None)
                elif isinstance(decision, policy.WaitUntil):
                    await self._sleep(max(0.0, decision.deadline - self.clock()))
                continue
            now = self.clock()
            for row in admit:
                self._tokens[row] = 0
                if row.request.first_batch_at is None:
                    row.request.first_batch_at = now
            for row in gone:
                self._tokens.pop(row, None)
            if admit:
                self.observer.rows_admitted(len(admit))
            picked, spans = self._pick_vocoder_work()
            newest = max([self._finished[row][1] for row in picked]
                         + [_RUNNING_ORDER if s.finished is None else self._finished[s.row][1] for s in spans],
                         default=-1)  # fmt: skip
            vocode = {row: self._finished.pop(row)[0] for row in picked}
            for row, (f, order, passed, solo) in list(self._finished.items()):
                if order < newest:  # overtaken by a row that finished after it
                    self._finished[row] = (f, order, passed + 1, solo)
            self._busy = True
            self._vocoded = self._vocoded or bool(vocode or spans)
            try:
                tick = await self.run_on_engine(self._tick, gone, admit, list(vocode.values()), spans)
                self._after_tick(tick, vocode)
                if self._retry:
                    rows, self._retry = self._retry, []
                    half = len(rows) // 2
                    for part in (rows[:half], rows[half:]):
                        part = [r for r in part if not r.request.finished]
                        if part:
                            await self._run_rows(part)
            finally:
                self._busy = False

    def _tick(self, gone: list[_Row], admit: list[_Row], vocode: list, spans: list[_Span]) -> _Tick:
        """On the engine thread: evict, admit, one step, then vocode the chosen finished rows and spans."""
        engine, tick = self.engine, _Tick()
        if gone:
            engine.evict(gone)
        try:
            if admit:
                engine.admit(admit, [self._segment(r) for r in admit])
            if engine.running:
                t0 = time.perf_counter()
                tick.step = engine.step()
                tick.step_s = time.perf_counter() - t0
        except Exception as exc:
            tick.step_error = exc
            engine.reset()
        if vocode:
            try:
                t0 = time.perf_counter()
                tick.wavs = engine.vocode(vocode)
                tick.vocode_s = time.perf_counter() - t0
                if len(tick.wavs) != len(vocode):
                    raise BatchError(f"engine returned {len(tick.wavs)} waveforms for {len(vocode)} rows")
            except Exception as exc:
                tick.vocode_error = exc
        finished_now = {f.key: f for f in tick.step.finished} if tick.step is not None else {}
        for job in spans:
            t0 = time.perf_counter()
            before = job.vocoder.vocoded
            try:
                f = job.finished or finished_now.get(job.row)
                if f is not None:
                    latents, final = f.latents, True
                elif job.row in engine.running:
                    latents, final = engine.latents_of(job.row), False
                else:  # evicted, or its step failed: nothing to vocode
                    continue
                wav = engine.vocode_span(job.vocoder, latents, final, job.max_frames)
                done = final and job.vocoder.done(len(latents))
                tick.spans.append((job, wav, None, time.perf_counter() - t0, job.vocoder.vocoded - before, done))
            except Exception as exc:
                tick.spans.append((job, None, exc, time.perf_counter() - t0, 0, False))
        tick.kv_positions = engine.kv_positions
        return tick

    def _after_tick(self, tick: _Tick, vocode: dict) -> None:
        if tick.step is not None:
            out = tick.step
            rows = len(out.keys)
            self.observer.batch_done(rows, tick.step_s, rows)
            for request in {row.request for row in out.keys}:
                request.engine_s += tick.step_s
            for row in out.keys:
                self._row_peak[row] = max(self._row_peak.get(row, 0), rows)
                self._tokens[row] = self._tokens.get(row, 0) + 1
            for f in out.finished:
                row = f.key
                self._running.pop(row, None)
                self._tokens.pop(row, None)
                if not row.request.finished:
                    self._finished[row] = (f, next(self._finish_order), 0, False)
                else:
                    self._row_peak.pop(row, None)
            self.observer.step_done(len(self._running), tick.step_s, tick.kv_positions, self._kv_cap)
        if tick.step_error is not None:
            self._step_failed(tick.step_error, list(self._running))
        if vocode:
            if tick.vocode_error is not None:
                self._vocode_failed(tick.vocode_error, vocode)
            else:
                self.observer.vocoder_done(tick.vocode_s)
                for (row, f), wav in zip(vocode.items(), tick.wavs, strict=True):
                    row.request.engine_s += tick.vocode_s / len(vocode)
                    self._deliver(row, SegmentAudio(f.codes, wav), 0.0, self._row_peak.pop(row, 1))
        for job, wav, error, seconds, work, done in tick.spans:
            self._span_done(job, wav, error, seconds, work, done)

    def _span_done(self, job: _Span, wav, error, seconds: float, work: int, done: bool) -> None:
        row, request = job.row, job.row.request
        if request.finished:
            return
        if error is not None:
            error = _classify(error)
            if isinstance(error, FatalEngineError):
                self._fatal(error, [row])
                return
            log.warning("request %s: segment %d failed in the vocoder: %s", request.req.request_id, row.index,
                        error)  # fmt: skip
            self.observer.rows_failed(1, error)
            request.fail(error)
            return
        if not np.isfinite(wav).all():
            self.observer.rows_failed(1, BatchError("non-finite audio"))
            request.fail(BatchError("generation produced non-finite audio (NaN or inf) for this segment"))
            return
        self.observer.vocoder_done(seconds)
        self.observer.span_vocoded(seconds, work, len(wav) // getattr(self.engine, "vocoder_hop", 256))
        request.engine_s += seconds
        if not request.streamed:  # a non-streamed row vocoded in spans: whole once its last span is in
            parts = request.spans.setdefault(row.index, [])
            parts.append(wav)
            if done:
                f = self._finished.pop(row)[0]
                self._deliver(row, SegmentAudio(f.codes, np.concatenate(parts)), 0.0, self._row_peak.pop(row, 1))
            return
        if job.grows:  # the current segment's span: the next one is longer
            request.span_frames = min(2 * request.span_frames, self._max_frames)
        self._give(request, row.index, wav, ended=done)
        if done:
            f = self._finished.pop(row)[0]
            self._segment_done(row, SegmentAudio(f.codes, np.zeros(0, dtype=np.float32)), 0.0,
                               self._row_peak.pop(row, 1))  # fmt: skip

    def _step_failed(self, exc: BaseException, rows: list[_Row]) -> None:
        error = _classify(exc)
        for row in rows:
            self._running.pop(row, None)
            self._row_peak.pop(row, None)
        rows = [r for r in rows if not r.request.finished]
        if isinstance(error, FatalEngineError):
            self._fatal(error, rows)
            return
        if len(rows) <= 1:
            for row in rows:
                log.warning("request %s: segment %d failed: %s", row.request.req.request_id, row.index, exc)
                self.observer.rows_failed(1, error)
                row.request.fail(error)
            return
        if isinstance(error, OutOfMemoryError):
            self._row_cap = max(1, len(rows) // 2)
            in_use = len(rows) * max(self._reservation(r) for r in rows)
            self._kv_cap = max(1, min(self._kv_cap, in_use // 2))
            self._oom_rows.update(rows)
            log.warning("batch of %d failed (%s: %s); re-admitting its rows from their prompts, at most %d rows "
                        "and %d KV positions", len(rows), type(exc).__name__, exc, self._row_cap,
                        self._kv_cap)  # fmt: skip
            for row in rows:
                self._waiting[row] = self._queued(row, self._reservation(row))
            self.observer.queue_depth(len(self._waiting))
            return
        # Any other error: the rows restart from their prompts (same seeds) as static batches split in halves,
        # down to the row that fails; the continuous batch resumes after them.
        log.warning("batch of %d failed (%s: %s); retrying in halves", len(rows), type(exc).__name__, exc)
        self._retry.extend(rows)

    def _vocode_failed(self, exc: BaseException, rows: dict) -> None:
        error = _classify(exc)
        if isinstance(error, FatalEngineError):
            self._fatal(error, list(rows))
            return
        if len(rows) > 1:  # a batched vocoder call: each row again, alone
            for row, f in rows.items():
                if not row.request.finished:
                    self._finished[row] = (f, next(self._finish_order), 0, True)
            return
        for row in rows:
            self._row_peak.pop(row, None)
            log.warning("request %s: segment %d failed in the vocoder: %s", row.request.req.request_id, row.index,
                        exc)  # fmt: skip
            self.observer.rows_failed(1, error)
            row.request.fail(error)

    def _preempt(self) -> list[_Row]:
        """Running later segments of streams sent back to the queue for waiting first segments (policy.preempt)."""
        if not any(w.starts_stream for w in self._waiting.values()):
            return []
        candidates = [
            policy.Running(row, row.due, self._tokens.get(row, 0)) for row in self._running
            if row.due is not None and not row.request.finished and row.index not in row.request.preempted
            and row.index != row.request.joiner.current and row.index not in row.request.vocoders
        ]  # fmt: skip
        victims = policy.preempt(list(self._waiting.values()), candidates,
                                 free_rows=max(0, self._row_cap - len(self._running)),
                                 min_lead_s=PREEMPT_MIN_LEAD_S)  # fmt: skip
        for row in victims:
            positions = self._running.pop(row)
            self._tokens.pop(row, None)
            self._row_peak.pop(row, None)
            row.request.preempted.add(row.index)
            self._waiting[row] = self._queued(row, positions)
        if victims:
            log.info("%d later segment(s) of streams back to the queue for streams waiting for their first audio",
                     len(victims))  # fmt: skip
            self.observer.rows_preempted(len(victims))
        return list(victims)


@dataclass(eq=False)
class _Tick:
    """What one engine-thread tick of continuous scheduling did."""

    step: StepOutput | None = None
    step_s: float = 0.0
    step_error: BaseException | None = None
    wavs: list | None = None
    vocode_s: float = 0.0
    vocode_error: BaseException | None = None
    kv_positions: int = 0
    spans: list = field(default_factory=list)  # (span, samples, error, seconds, frames vocoded, row done)
