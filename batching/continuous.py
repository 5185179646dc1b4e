"""The continuous core (SCHEDULING=continuous, an engine with the step-level calls), read as vLLM v1's
EngineCore.step: at every step boundary

    plan = self._schedule()            scheduler task: rows whose request is gone leave, later segments of streams
                                       may be preempted, policy.next_admission picks the rows that join, and
                                       batching.spans plans the vocoder's work
    tick = self._execute(plan)         engine thread: evict, admit, one step, the vocoder's work
    self._update(plan, tick)           scheduler task: rows that finished wait for the vocoder, audio goes to its
                                       request, failures are handled (batching.failures)

A failing step restarts its rows from their prompts (same seeds, so the retry is deterministic) as static batches
split in halves; an out-of-memory step halves the row budget (and the KV budget to what was in use) and re-admits
its rows from their prompts, oldest first; the budgets come back when the batch drains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from batching import policy
from batching.engine import SegmentAudio
from batching.errors import BatchError, FatalEngineError, OutOfMemoryError
from batching.failures import classify, fail_row, finite_or_fail, log, retry_in_halves
from batching.records import PREEMPT_MIN_LEAD_S, _Row
from batching.running import FinishedRow, StepOutput
from batching.spans import _Finished, _Span


@dataclass(frozen=True, eq=False)
class _Plan:
    """What one tick does: rows evicted, rows admitted, finished rows vocoded whole, spans vocoded."""

    gone: list[_Row]
    admit: list[_Row]
    vocode: dict[_Row, FinishedRow]
    spans: list[_Span]


@dataclass(eq=False)
class _SpanResult:
    """One span the vocoder took: its samples (or the error), the seconds and frames it cost."""

    span: _Span
    wav: np.ndarray | None
    error: BaseException | None
    seconds: float
    frames: int  # frames the vocoder ran on (its work)
    done: bool  # the row's last span


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
    spans: list[_SpanResult] = field(default_factory=list)


class _ContinuousCore:
    """The Scheduler's continuous core (a mixin: it uses the Scheduler's queue, engine thread, observer and clock;
    its own state is set up by `_init_continuous`)."""

    def _init_continuous(self) -> None:
        self._running: dict[_Row, int] = {}  # row -> its KV reservation
        self._finished: dict[_Row, _Finished] = {}  # rows that finished decoding, waiting for the vocoder
        self._finish_count = 0
        self._row_cap = self.max_batch_size  # shrunk after an out-of-memory step, restored when the batch drains
        self._kv_cap = self.max_batch_tokens
        self._row_peak: dict[_Row, int] = {}  # the most rows a running row shared a step with
        self._retry: list[_Row] = []
        self._tokens: dict[_Row, int] = {}  # running row -> tokens decoded (its latents so far)
        self._vocoded = False  # the vocoder ran since the engine last gave memory back
        self._oom_rows: set[_Row] = set()  # rows re-queued after an out-of-memory step

    async def _run_continuous(self) -> None:
        try:
            while True:
                plan = self._schedule()
                if isinstance(plan, _Plan):
                    await self._run_plan(plan)
                else:
                    await self._idle(plan)
        except Exception as exc:  # a bug here must not leave every job waiting forever: fail them, then exit
            log.exception("the scheduler loop failed")
            self._fatal(FatalEngineError(f"the scheduler failed: {type(exc).__name__}: {exc}"),
                        list(self._waiting))  # fmt: skip

    # ---------------------------------------------------------------- schedule (scheduler task)

    def _schedule(self) -> _Plan | policy.Decision:
        """This tick's plan; or, when nothing runs or waits for the vocoder, the policy's decision to wait on."""
        self._expire()
        gone = self._sweep()
        gone += self._preempt()  # evicted from the engine like rows that left; they wait again
        decision, admit = self._waiting.next_admission(
            self.clock(), running_rows=len(self._running), running_span=max(self._running.values(), default=0),
            max_rows=self._row_cap, max_positions=self._kv_cap, batch_wait_s=self.batch_wait_s,
        )  # fmt: skip
        self._running.update(admit)
        if isinstance(decision, policy.Batch) and decision.keys:
            self.observer.queue_depth(len(self._waiting))
        if not self._running and not self._finished and not gone:
            return decision
        now = self.clock()
        for row in admit:
            self._tokens[row] = 0
            if row.request.first_batch_at is None:
                row.request.first_batch_at = now
        for row in gone:
            self._tokens.pop(row, None)
        if admit:
            self.observer.rows_admitted(len(admit))
        vocode, spans = self._plan_vocoder()
        return _Plan(gone, list(admit), vocode, spans)

    def _sweep(self) -> list[_Row]:
        """Rows whose request is gone leave (the running ones are returned: the engine evicts them); the budgets
        come back once the batch has drained since the last out-of-memory step."""
        gone = [r for r in self._running if r.request.finished]
        for row in gone:
            del self._running[row]
            self._row_peak.pop(row, None)
        if gone:
            self.observer.rows_evicted(len(self._running))
        for row in [r for r in self._finished if r.request.finished]:
            del self._finished[row]
        self._oom_rows = {r for r in self._oom_rows if r in self._waiting or r in self._running}
        if not self._running and not self._oom_rows:
            self._row_cap, self._kv_cap = self.max_batch_size, self.max_batch_tokens
        return gone

    def _preempt(self) -> list[_Row]:
        """Running later segments of streams sent back to the queue for waiting first segments (policy.preempt)."""
        if not self._waiting.starts_stream:
            return []
        candidates = [
            policy.Running(row, row.due, self._tokens.get(row, 0)) for row in self._running
            if row.due is not None and not row.request.finished and row.index not in row.request.preempted
            and row.index != row.request.joiner.current and row.index not in row.request.vocoders
        ]  # fmt: skip
        victims = policy.preempt(self._waiting.entries(), candidates,
                                 free_rows=max(0, self._row_cap - len(self._running)),
                                 min_lead_s=PREEMPT_MIN_LEAD_S)  # fmt: skip
        for row in victims:
            positions = self._running.pop(row)
            self._tokens.pop(row, None)
            self._row_peak.pop(row, None)
            row.request.preempted.add(row.index)
            self._waiting.put(row, positions)
        if victims:
            log.info("%d later segment(s) of streams back to the queue for streams waiting for their first audio",
                     len(victims))  # fmt: skip
            self.observer.rows_preempted(len(victims))
        return list(victims)

    async def _idle(self, decision: policy.Decision) -> None:
        """Nothing to run: give memory back once after vocoder work, or sleep until the policy's deadline or a poke."""
        if isinstance(decision, policy.Idle):
            if self._vocoded:
                self._vocoded = False
                await self.run_on_engine(self.engine.release_memory)
                return  # the world may have changed while the engine thread trimmed
            await self._sleep(None)
        elif isinstance(decision, policy.WaitUntil):
            await self._sleep(max(0.0, decision.deadline - self.clock()))

    async def _run_plan(self, plan: _Plan) -> None:
        self._busy = True
        self._vocoded = self._vocoded or bool(plan.vocode or plan.spans)
        try:
            tick = await self.run_on_engine(self._execute, plan)
            self._update(plan, tick)
            if self._retry:
                rows, self._retry = self._retry, []
                await retry_in_halves(rows, self._run_rows)
        finally:
            self._busy = False

    # ---------------------------------------------------------------- execute (engine thread)

    def _execute(self, plan: _Plan) -> _Tick:
        """On the engine thread: evict, admit, one step, then vocode the planned finished rows and spans."""
        engine, tick = self.engine, _Tick()
        if plan.gone:
            engine.evict(plan.gone)
        try:
            if plan.admit:
                engine.admit(plan.admit, [r.segment() for r in plan.admit])
            if engine.running:
                t0 = time.perf_counter()
                tick.step = engine.step()
                tick.step_s = time.perf_counter() - t0
        except Exception as exc:
            tick.step_error = exc
            engine.reset()
        if plan.vocode:
            self._execute_vocode(list(plan.vocode.values()), tick)
        finished_now = {f.key: f for f in tick.step.finished} if tick.step is not None else {}
        for span in plan.spans:
            result = self._execute_span(span, finished_now.get(span.row))
            if result is not None:
                tick.spans.append(result)
        tick.kv_positions = engine.kv_positions
        return tick

    def _execute_vocode(self, rows: list[FinishedRow], tick: _Tick) -> None:
        try:
            t0 = time.perf_counter()
            tick.wavs = self.engine.vocode(rows)
            tick.vocode_s = time.perf_counter() - t0
            if len(tick.wavs) != len(rows):
                raise BatchError(f"engine returned {len(tick.wavs)} waveforms for {len(rows)} rows")
        except Exception as exc:
            tick.vocode_error = exc

    def _execute_span(self, span: _Span, finished_now: FinishedRow | None) -> _SpanResult | None:
        """One span; None when its row has nothing to vocode (evicted, or its step failed)."""
        engine, vocoder = self.engine, span.vocoder
        t0 = time.perf_counter()
        before = vocoder.vocoded
        try:
            f = span.finished or finished_now
            if f is not None:
                latents, final = f.latents, True
            elif span.row in engine.running:
                latents, final = engine.latents_of(span.row), False
            else:
                return None
            wav = engine.vocode_span(vocoder, latents, final, span.max_frames)
            done = final and vocoder.done(len(latents))
            return _SpanResult(span, wav, None, time.perf_counter() - t0, vocoder.vocoded - before, done)
        except Exception as exc:
            return _SpanResult(span, None, exc, time.perf_counter() - t0, 0, False)

    # ---------------------------------------------------------------- update (scheduler task)

    def _update(self, plan: _Plan, tick: _Tick) -> None:
        if tick.step is not None:
            self._step_done(tick)
        if tick.step_error is not None:
            self._step_failed(tick.step_error, list(self._running))
        if plan.vocode:
            if tick.vocode_error is not None:
                self._vocode_failed(tick.vocode_error, plan.vocode)
            else:
                self.observer.vocoder_done(tick.vocode_s)
                for (row, f), wav in zip(plan.vocode.items(), tick.wavs, strict=True):
                    row.request.engine_s += tick.vocode_s / len(plan.vocode)
                    self._deliver(row, SegmentAudio(f.codes, wav), 0.0, self._row_peak.pop(row, 1))
        for result in tick.spans:
            self._span_done(result)

    def _step_done(self, tick: _Tick) -> None:
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
                self._finished[row] = self._finished_entry(f)
            else:
                self._row_peak.pop(row, None)
        self.observer.step_done(len(self._running), tick.step_s, tick.kv_positions, self._kv_cap)

    def _finished_entry(self, f: FinishedRow, solo: bool = False) -> _Finished:
        self._finish_count += 1
        return _Finished(f, self._finish_count - 1, 0, solo)

    def _span_done(self, result: _SpanResult) -> None:
        span, row = result.span, result.span.row
        request = row.request
        if request.finished:
            return
        if result.error is not None:
            error = classify(result.error)
            if isinstance(error, FatalEngineError):
                self._fatal(error, [row])
            else:
                fail_row(self.observer, row, error, stage=" in the vocoder")
            return
        if not finite_or_fail(self.observer, row, result.wav):
            return
        self.observer.vocoder_done(result.seconds)
        self.observer.span_vocoded(result.seconds, result.frames, len(result.wav) // self.engine.vocoder_hop)
        request.engine_s += result.seconds
        if not request.streamed:  # a non-streamed row vocoded in spans: whole once its last span is in
            parts = request.spans.setdefault(row.index, [])
            parts.append(result.wav)
            if result.done:
                f = self._finished.pop(row).result
                self._deliver(row, SegmentAudio(f.codes, np.concatenate(parts)), 0.0, self._row_peak.pop(row, 1))
            return
        if span.grows:  # the current segment's span: the next one is longer
            request.span_frames = min(2 * request.span_frames, self._max_frames)
        request.give(row.index, result.wav, ended=result.done)
        if result.done:
            f = self._finished.pop(row).result
            request.segment_done(row.index, SegmentAudio(f.codes, np.zeros(0, dtype=np.float32)), 0.0,
                                 self._row_peak.pop(row, 1))  # fmt: skip

    def _step_failed(self, exc: BaseException, rows: list[_Row]) -> None:
        error = classify(exc)
        for row in rows:
            self._running.pop(row, None)
            self._row_peak.pop(row, None)
        rows = [r for r in rows if not r.request.finished]
        if isinstance(error, FatalEngineError):
            self._fatal(error, rows)
        elif len(rows) <= 1:
            for row in rows:
                fail_row(self.observer, row, error)
        elif isinstance(error, OutOfMemoryError):
            self._shrink_budgets(exc, rows)
        else:
            # The rows restart from their prompts (same seeds) as static batches split in halves, down to the
            # row that fails; the continuous batch resumes after them.
            log.warning("batch of %d failed (%s: %s); retrying in halves", len(rows), type(exc).__name__, exc)
            self._retry.extend(rows)

    def _shrink_budgets(self, exc: BaseException, rows: list[_Row]) -> None:
        """An out-of-memory step: half the rows, half the KV positions in use; its rows wait again, oldest first."""
        self._row_cap = max(1, len(rows) // 2)
        in_use = len(rows) * max(self._reservation(r) for r in rows)
        self._kv_cap = max(1, min(self._kv_cap, in_use // 2))
        self._oom_rows.update(rows)
        log.warning("batch of %d failed (%s: %s); re-admitting its rows from their prompts, at most %d rows "
                    "and %d KV positions", len(rows), type(exc).__name__, exc, self._row_cap,
                    self._kv_cap)  # fmt: skip
        for row in rows:
            self._waiting.put(row, self._reservation(row))
        self.observer.queue_depth(len(self._waiting))

    def _vocode_failed(self, exc: BaseException, rows: dict[_Row, FinishedRow]) -> None:
        error = classify(exc)
        if isinstance(error, FatalEngineError):
            self._fatal(error, list(rows))
        elif len(rows) > 1:  # a batched vocoder call: each row again, alone
            for row, f in rows.items():
                if not row.request.finished:
                    self._finished[row] = self._finished_entry(f, solo=True)
        else:
            for row in rows:
                self._row_peak.pop(row, None)
                fail_row(self.observer, row, error, stage=" in the vocoder")
