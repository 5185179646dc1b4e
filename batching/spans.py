"""Planning the vocoder's work of one continuous tick: which finished rows it vocodes whole, and which spans.

A row is vocoded span by span (batching.vocoder: the same samples as one call on the whole row) when its request
is streamed, or when `vocoder_span_s` (VOCODER_SPAN_S) is set: then every finished row goes in spans of at most
that much audio. Otherwise a finished row is vocoded whole. On the CPU, where the vocoder runs between steps, a
tick does one piece of vocoder work; where the engine vocodes in batches (CUDA), every pending finished row at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from batching import policy
from batching.protocols import SpanVocoder
from batching.records import _Row
from batching.running import FinishedRow

# A span of a row still decoding counts as finishing after every row that has finished (policy.next_vocode).
_RUNNING_ORDER = 1 << 62


@dataclass(eq=False)
class _Finished:
    """A row that finished decoding and waits for the vocoder."""

    result: FinishedRow  # its codes and latents
    order: int  # finishing order (policy.next_vocode: the older first, among equals)
    passed: int = 0  # times a row that finished after it was vocoded first (policy.next_vocode's cap)
    solo: bool = False  # a batched vocoder call with it failed: it goes alone now


@dataclass(frozen=True, eq=False)
class _Span:
    """A span of a row for the vocoder (a streamed row, or any row when vocoder_span_s is set): of a row still
    decoding when `finished` is None."""

    row: _Row
    vocoder: SpanVocoder  # batching.vocoder.RowVocoder
    finished: FinishedRow | None
    max_frames: int | None  # None: the rest of the row (vocoded whole)
    frames: int  # about how many frames it gives (the policy's length)
    first: bool  # it gives its request's first audio
    grows: bool  # the current segment's span of a streamed request: the next one is twice as long


def _frames_estimate(tokens: int, speed: float) -> int:
    """About how many vocoder frames a row of `tokens` audio tokens gives (XTTS: 1024 samples per token at
    22050 Hz, 256 per frame at 24000 Hz), to compare whole rows with spans."""
    return round(tokens * 4 * 24000 / 22050 / max(speed, 0.05))


class _SpanPlanner:
    """The Scheduler's planning of vocoder work (a mixin: it reads the continuous core's finished and running rows)."""

    def _plan_vocoder(self) -> tuple[dict[_Row, FinishedRow], list[_Span]]:
        """This tick's vocoder work, taken out of the finished rows: rows vocoded whole, and spans. A finished row
        that a row finished after it overtakes counts that (policy.next_vocode's cap on being passed over)."""
        picked, spans = self._pick_vocoder_work()
        newest = max([self._finished[row].order for row in picked]
                     + [self._order_of(s) for s in spans], default=-1)  # fmt: skip
        vocode = {row: self._finished.pop(row).result for row in picked}
        for f in self._finished.values():
            if f.order < newest:  # overtaken by a row that finished after it
                f.passed += 1
        return vocode, spans

    def _order_of(self, span: _Span) -> int:
        return _RUNNING_ORDER if span.finished is None else self._finished[span.row].order

    def _pick_vocoder_work(self) -> tuple[list[_Row], list[_Span]]:
        """Finished rows to vocode whole, and spans.

        First the first span of a streamed request that has given out nothing yet (the oldest request first: time
        to first audio). Then, where the engine vocodes in batches (CUDA), every pending finished row in one batch
        (those that failed in a batch: one alone), and one span; otherwise, shortest first (policy.next_vocode), one
        finished row or one span.
        """
        whole = {r: f for r, f in self._finished.items() if not self._in_spans(r)}
        spans = self._span_candidates()
        first = [c for c in spans if c.first]
        if first:
            return [], [min(first, key=lambda c: c.row.order)]
        if self.engine.vocoder_batched:
            rows = [r for r, f in whole.items() if not f.solo] or list(whole)[:1]
            key = policy.next_vocode([policy.Finished(c, c.frames, self._order_of(c), 0) for c in spans])
            return rows, [key] if key is not None else []
        pending = [policy.Finished(row, _frames_estimate(len(f.result.codes), row.request.req.params.speed),
                                   f.order, f.passed) for row, f in whole.items()]  # fmt: skip
        for c in spans:
            passed = 0 if c.finished is None else self._finished[c.row].passed
            pending.append(policy.Finished(c, c.frames, self._order_of(c), passed))
        key = policy.next_vocode(pending)
        if key is None:
            return [], []
        return ([], [key]) if isinstance(key, _Span) else ([key], [])

    def _in_spans(self, row: _Row) -> bool:
        """Is this finished row vocoded span by span (streamed, or vocoder_span_s set) rather than whole?"""
        return row.request.streamed or self._span_cap is not None

    def _vocoder_of(self, row: _Row) -> SpanVocoder:
        vocoder = row.request.vocoders.get(row.index)
        if vocoder is None:
            vocoder = row.request.vocoders[row.index] = self.engine.row_vocoder(row.segment())
        return vocoder

    def _span_candidates(self) -> list[_Span]:
        """Spans the vocoder could take now: of a streamed request, the current segment's next span (once that
        many frames are settled, or its row finished) and any finished later segment; of a non-streamed request
        (vocoder_span_s), a finished row's next span."""
        out = []
        rows = [r for r in self._running if r.request.streamed] + [r for r in self._finished if self._in_spans(r)]
        for row in rows:
            if row.request.finished:
                continue
            span = self._streamed_span(row) if row.request.streamed else self._capped_span(row)
            if span is not None:
                out.append(span)
        return out

    def _capped_span(self, row: _Row) -> _Span:
        """A finished row of a non-streamed request: its next span of at most vocoder_span_s."""
        f = self._finished[row].result
        vocoder = self._vocoder_of(row)
        frames = min(vocoder.ready(len(f.latents), final=True), self._span_cap)
        return _Span(row, vocoder, f, self._span_cap, frames, False, False)

    def _streamed_span(self, row: _Row) -> _Span | None:
        request = row.request
        current = row.index == request.joiner.current
        finished = self._finished[row].result if row in self._finished else None
        if finished is None and not current:
            return None
        vocoder = self._vocoder_of(row)
        # The current segment's spans grow from STREAM_FIRST_CHUNK_S; a finished later segment goes in spans of at
        # most vocoder_span_s, as any finished row (None: whole).
        limit = request.span_frames if current else self._span_cap
        if finished is not None:
            ready = vocoder.ready(len(finished.latents), final=True)
            frames = ready if limit is None else min(ready, limit)
        else:
            ready = vocoder.ready(self._tokens.get(row, 0), final=False)
            if ready < limit:
                return None
            frames = limit
        return _Span(row, vocoder, finished, limit, frames, current and request.joiner.given == 0, current)
