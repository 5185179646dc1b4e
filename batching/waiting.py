"""The waiting queue: segments (rows) that wait for the engine, as the policy sees them.

After TGI's router queue (queue.rs): the scheduler task alone owns it; budgets go in (`next_batch`,
`next_admission`), and the rows taken come out, already removed. Rows of paused streams (a stalled reader's) stay
out of the policy's sight; a row sent back (after an out-of-memory step, or preempted) keeps its rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from batching import policy
from batching.records import _Request, _Row


def entry(row: _Row, positions: int) -> policy.Waiting:
    """What the policy sees of a row in the queue (at submit, and when it goes back after an OOM or a preemption:
    the same rank as before)."""
    request = row.request
    return policy.Waiting(row, request.req.voice_key, len(request.texts[row.index].tokens),
                          request.submitted_at, row.order, positions, row.due,
                          starts_stream=request.streamed and row.index == 0)  # fmt: skip


class WaitingQueue:
    def __init__(self):
        self._entries: dict[_Row, policy.Waiting] = {}
        self._order = itertools.count()

    def next_order(self) -> int:
        """The rank of a new row (submit order)."""
        return next(self._order)

    def put(self, row: _Row, positions: int) -> None:
        """A row waits (new, or back after an out-of-memory step or a preemption), holding `positions` of KV."""
        self._entries[row] = entry(row, positions)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[_Row]:
        return iter(self._entries)

    def __contains__(self, row: object) -> bool:
        return row in self._entries

    @property
    def starts_stream(self) -> bool:
        """Is a stream's first segment waiting (policy.preempt's cue)?"""
        return any(w.starts_stream for w in self._entries.values())

    def entries(self) -> list[policy.Waiting]:
        return list(self._entries.values())

    def admissible(self) -> list[policy.Waiting]:
        """The waiting segments the policy may pick: all but those of paused streams (a stalled reader's)."""
        return [waiting for row, waiting in self._entries.items() if not row.request.paused]

    def drop(self, request: _Request) -> None:
        """Every waiting row of a request that is gone."""
        for row in [r for r in self._entries if r.request is request]:
            del self._entries[row]

    def clear(self) -> list[_Row]:
        """Empty the queue; the rows that were in it."""
        rows = list(self._entries)
        self._entries.clear()
        return rows

    def next_batch(self, now: float, *, max_batch_size: int, batch_wait_s: float):
        """Static scheduling: policy.next_batch's decision, and the rows it takes out of the queue (their requests
        still in hand)."""
        decision = policy.next_batch(self.admissible(), now, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
        rows = list(decision.keys) if isinstance(decision, policy.Batch) else []
        return decision, self._take(rows)

    def next_admission(self, now: float, *, running_rows: int, running_span: int, max_rows: int,
                       max_positions: int, batch_wait_s: float):  # fmt: skip
        """Continuous scheduling: policy.next_admission's decision under the row and KV budgets, and the rows that
        join, each with its KV reservation (their requests still in hand)."""
        decision = policy.next_admission(
            self.admissible(), now, running_rows=running_rows, running_span=running_span,
            max_rows=max_rows, max_positions=max_positions, batch_wait_s=batch_wait_s,
        )  # fmt: skip
        rows = list(decision.keys) if isinstance(decision, policy.Batch) else []
        reservations = {row: self._entries[row].positions for row in rows}
        return decision, {row: reservations[row] for row in self._take(rows)}

    def _take(self, rows: list[_Row]) -> list[_Row]:
        for row in rows:
            del self._entries[row]
        return [r for r in rows if not r.request.finished]
