"""The static loop (SCHEDULING=static, and engines without the step-level calls): policy.next_batch forms a batch
that runs to completion (engine.generate), then the next. A failing batch is retried in halves down to the row
that fails (batching.failures); the continuous core retries a failed step's rows the same way, through `_run_rows`.
"""

from __future__ import annotations

import time

from batching import policy
from batching.engine import SegmentAudio
from batching.errors import BatchError, FatalEngineError
from batching.failures import classify, fail_row, finite_or_fail, log, retry_in_halves
from batching.records import _Row


class _StaticLoop:
    """The Scheduler's static loop (a mixin: it uses the Scheduler's queue, engine thread, observer and clock)."""

    async def _run(self) -> None:
        while True:
            self._expire()
            decision, rows = self._waiting.next_batch(self.clock(), max_batch_size=self.max_batch_size,
                                                      batch_wait_s=self.batch_wait_s)  # fmt: skip
            if isinstance(decision, policy.Idle):
                await self._sleep(None)
            elif isinstance(decision, policy.WaitUntil):
                await self._sleep(max(0.0, decision.deadline - self.clock()))
            else:
                self.observer.queue_depth(len(self._waiting))
                if rows:
                    self._busy = True
                    try:
                        await self._run_rows(rows)
                    finally:
                        self._busy = False

    async def _run_rows(self, rows: list[_Row]) -> None:
        """Run rows as one batch; on failure, split in halves and retry each, so only failing rows fail."""
        started = self.clock()
        self.observer.rows_admitted(len(rows))
        for row in rows:
            if row.request.first_batch_at is None:
                row.request.first_batch_at = started
        segments = [r.segment() for r in rows]
        t0 = time.perf_counter()
        try:
            audio = await self.run_on_engine(self.engine.generate, segments)
            if len(audio) != len(rows):
                raise BatchError(f"engine returned {len(audio)} results for {len(rows)} rows")
        except Exception as exc:
            await self._batch_failed(exc, rows)
            return
        elapsed = time.perf_counter() - t0
        self.observer.batch_done(len(rows), elapsed, sum(len(a.codes) for a in audio))
        if self.engine.last_vocoder_s is not None:
            self.observer.vocoder_done(self.engine.last_vocoder_s)
        for row, result in zip(rows, audio, strict=True):
            self._deliver(row, result, elapsed, len(rows))

    async def _batch_failed(self, exc: Exception, rows: list[_Row]) -> None:
        error = classify(exc)
        if isinstance(error, FatalEngineError):
            self._fatal(error, rows)
        elif len(rows) == 1:
            fail_row(self.observer, rows[0], error)
        else:
            log.warning("batch of %d failed (%s: %s); retrying in halves", len(rows), type(exc).__name__, exc)
            await retry_in_halves(rows, self._run_rows)

    def _deliver(self, row: _Row, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        """One segment's whole audio to its request, unless its request is gone or the audio is not finite."""
        if not row.request.finished and finite_or_fail(self.observer, row, result.wav):
            row.request.deliver(row.index, result, engine_s, batch_size)
