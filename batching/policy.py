"""The batch policy: which waiting segments run next. Pure functions of the queue, the running batch and `now`.

No awaits, no torch, no clock reads, no metrics: the scheduler passes everything in, tests build it by hand.

`next_admission` (SCHEDULING=continuous, the default) is asked at every decoding step boundary:
1. Nothing waits: idle.
2. Nothing runs, every waiting segment fits with room for more and the oldest has waited less than
   `batch_wait_s`: wait for company (a batch that starts together shares its prefill). While rows run, arrivals
   join at the next step: no wait.
3. Otherwise waiting segments join oldest first (strictly: a segment that does not fit holds the younger ones
   back, so a long segment is never starved by short ones) while the batch stays within both budgets. "Oldest"
   is by when the audio is needed: at arrival, except for a streamed request's later segments, which are needed
   only once the segments before them have played (`Waiting.due`, set by the scheduler): the first segments of
   other streams go before them, so every stream starts early; a due time is finite, so nothing starves.
   - rows: at most `max_rows` running;
   - KV positions: rows x the largest row reservation (prefix + longest audio the row may reach) stays within
     `max_positions`. The running cache holds at most rows x max(prefix + tokens so far) positions, padding
     included (batching.running compacts it as rows leave), so admission under this rule can never grow the
     cache past the budget. A lone segment larger than the whole budget runs alone rather than never.
   A streamed request's first segment that finds every row taken may take the row of a later segment of another
   stream whose audio is not needed soon (`preempt`): see there.
   Same-voice grouping buys nothing here: every row carries its own latents (fetched once per voice at submit)
   and a row's cost does not depend on its neighbours' voices.

`next_vocode` picks which finished row the vocoder takes next: the shortest first, so a short job is never held
behind long rows that finished just before it, unless a row has been overtaken `max_passes` times already.

`next_batch` (SCHEDULING=static) forms whole batches that run to completion. Rules, in order:
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
    positions: int = 0  # KV positions the row may come to hold (continuous scheduling's budget)
    due: float | None = None  # when its audio is needed, if not at once (a streamed request's later segments)
    starts_stream: bool = False  # the first segment of a streamed request: its first audio waits on it

    @property
    def rank(self) -> tuple[float, int]:
        """Admission order: by when the audio is needed (arrival, unless `due` says later), then arrival order."""
        return (self.enqueued_at if self.due is None else self.due, self.order)


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


def next_admission(
    waiting: Sequence[Waiting],
    now: float,
    *,
    running_rows: int,
    running_span: int,
    max_rows: int,
    max_positions: int,
    batch_wait_s: float,
) -> Decision:
    """Which waiting segments join the running batch at this step boundary. `running_span`: the largest
    reservation (`Waiting.positions`) among the running rows. Batch(()) means nothing fits now: keep stepping."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be an integer >= 1, got {max_positions}")
    if not waiting:
        return Idle()
    ordered = sorted(waiting, key=lambda w: w.rank)
    chosen = []
    rows, span = running_rows, running_span
    for w in ordered:
        if rows >= max_rows:
            break
        wider = max(span, w.positions)
        if (rows + 1) * wider > max_positions and rows > 0:
            break
        chosen.append(w.key)
        rows, span = rows + 1, wider
    # An idle engine waits for company while there is room for it (a batch that starts together shares its
    # prefill); while rows run, arrivals join at once.
    room = len(chosen) == len(ordered) and rows < max_rows
    first = min(w.enqueued_at for w in ordered)
    if running_rows == 0 and room and now - first < batch_wait_s:
        return WaitUntil(first + batch_wait_s)
    return Batch(tuple(chosen))


@dataclass(frozen=True)
class Running:
    """What `preempt` knows of one running row."""

    key: object
    due: float | None  # a streamed request's later segment: when its audio is needed; None: never preempted
    decoded: int  # tokens decoded so far (the work a preemption throws away)


def preempt(waiting: Sequence[Waiting], running: Sequence[Running], *, free_rows: int, min_lead_s: float) -> tuple:
    """Running rows to send back to the queue, so that waiting first segments of streams start now.

    When more first segments of streams wait than rows are free, each may take the row of a later segment of a
    stream whose audio is needed at least `min_lead_s` after its own (the starter's arrival: compared on the
    timeline of need, not with the clock of the step boundary, which on a CPU comes seconds later): the latest
    needed first, the least decoded among equals. The row restarts from its prompt when it is admitted again (by its due time, as
    before): its seed is its own, so it decodes the same tokens, and nothing of it was given out yet (only a
    stream's current segment is vocoded while it runs; the caller passes only rows that are not). The caller
    passes each row at most once in its life, which bounds the work thrown away to one partial row each."""
    if free_rows < 0:
        raise ValueError(f"free_rows must be >= 0, got {free_rows}")
    # Those that admission, by rank, would leave without a row.
    starters = [w for w in sorted(waiting, key=lambda w: w.rank)[free_rows:] if w.starts_stream]
    victims = sorted((r for r in running if r.due is not None), key=lambda r: (-r.due, r.decoded))
    chosen = []
    for starter, victim in zip(starters, victims):
        if victim.due < starter.rank[0] + min_lead_s:  # needed about as soon as the starter: keep it (and the rest)
            break
        chosen.append(victim.key)
    return tuple(chosen)


@dataclass(frozen=True)
class Finished:
    """What the policy knows of one finished row waiting for the vocoder."""

    key: object
    length: int  # audio tokens: the vocoder's cost grows with it
    order: int  # finishing order
    passed: int  # times a row that finished after it was vocoded before it


def next_vocode(pending: Sequence[Finished], *, max_passes: int = 4) -> object | None:
    """The key of the finished row to vocode next, or None when none waits."""
    if not pending:
        return None
    starved = [f for f in pending if f.passed >= max_passes]
    if starved:
        return min(starved, key=lambda f: f.order).key
    return min(pending, key=lambda f: (f.length, f.order)).key
