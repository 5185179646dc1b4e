"""The waiting queue: segments that wait for the engine, as the policy sees them."""

from __future__ import annotations

from batching import policy
from batching.errors import JobTimeoutError
from batching.records import _Request, _Row


class _WaitingQueue:
    def _admissible(self) -> list[policy.Waiting]:
        """The waiting segments the policy may pick: all but those of paused streams (a stalled reader's)."""
        return [waiting for row, waiting in self._waiting.items() if not row.request.paused]

    def _drop(self, request: _Request) -> None:
        for row in [r for r in self._waiting if r.request is request]:
            del self._waiting[row]
        self.observer.queue_depth(len(self._waiting))

    def _expire(self) -> None:
        now = self.clock()
        for request in {r.request for r in [*self._waiting, *self._running, *self._finished]}:
            deadline = request.req.deadline
            if deadline is not None and now >= deadline:
                request.fail(JobTimeoutError(f"job timed out after waiting {now - request.submitted_at:.1f} s"))
                self._drop(request)

    def _reservation(self, row: _Row) -> int:
        return self.engine.reserve_positions(self._segment(row))

    @staticmethod
    def _queued(row: _Row, positions: int) -> policy.Waiting:
        """What the policy sees of a row in the queue (at submit, and when it goes back after an OOM or a
        preemption: the same rank as before)."""
        request = row.request
        return policy.Waiting(row, request.req.voice_key, len(request.texts[row.index].tokens),
                              request.submitted_at, row.order, positions, row.due,
                              starts_stream=request.streamed and row.index == 0)  # fmt: skip
