"""The batch policy: which waiting segments run together next. A pure function of the queue and `now`.

No awaits, no torch, no clock reads, no metrics: the scheduler passes everything in, tests build it by hand.

Rules, in order:
1. Nothing waits: idle.
2. Fewer than `max_batch_size` rows wait and the oldest has waited less than `batch_wait_s`: wait for company,
   until the oldest's wait runs out (a new arrival wakes the scheduler earlier).
3. Otherwise a batch is formed around the oldest segment (so nothing starves):
   - first the segments of the same voice (their speaker latents are fetched once), oldest first;
   - then, if rows are left, segments of other voices, those closest in length to the batch first, so rows
     finish together (a finished row leaves the batch, but a long lone row keeps the whole batch going);
   - at most `max_batch_size` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """What the policy knows of one waiting segment."""

    key: object  # opaque to the policy: handed back in the Batch
    voice: str
    length: int  # expected decoding steps (text tokens are a good proxy)
    enqueued_at: float  # seconds, on the scheduler's clock
    order: int  # arrival order, to break ties deterministically


@dataclass(frozen=True)
class Idle:
    pass


@dataclass(frozen=True)
class WaitUntil:
    deadline: float


@dataclass(frozen=True)
class Batch:
    keys: tuple


Decision = Idle | WaitUntil | Batch


def next_batch(waiting: Sequence[Waiting], now: float, *, max_batch_size: int, batch_wait_s: float) -> Decision:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size}")
    if not waiting:
        return Idle()
    oldest = min(waiting, key=lambda w: (w.enqueued_at, w.order))
    if len(waiting) < max_batch_size and now - oldest.enqueued_at < batch_wait_s:
        return WaitUntil(oldest.enqueued_at + batch_wait_s)

    same = sorted((w for w in waiting if w.voice == oldest.voice), key=lambda w: (w.enqueued_at, w.order))
    chosen = same[:max_batch_size]
    spare = max_batch_size - len(chosen)
    if spare:
        target = sum(w.length for w in chosen) / len(chosen)
        others = [w for w in waiting if w.voice != oldest.voice]
        others.sort(key=lambda w: (abs(w.length - target), w.enqueued_at, w.order))
        chosen += others[:spare]
    return Batch(tuple(w.key for w in chosen))
