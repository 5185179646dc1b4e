"""Planning the vocoder's work of one continuous tick: finished rows vocoded whole, and spans of rows."""

from __future__ import annotations

from dataclasses import dataclass

from batching import policy
from batching.records import _Row


class _SpanPlanner:
    def _pick_vocoder_work(self) -> tuple[list[_Row], list[_Span]]:
        """What the vocoder does in this tick: finished rows to vocode whole, and spans of streamed rows.

        On the CPU, where the vocoder runs between steps, one piece of work per tick: first the first span of a
        streamed request that has given out nothing yet (the oldest request first: time to first audio); then,
        shortest first (policy.next_vocode), a finished row or the next span of a streamed request's current
        segment. Where the engine vocodes in batches (CUDA), every pending finished row in one batch, and one span.
        """
        whole = {r: v for r, v in self._finished.items() if not self._in_spans(r)}
        spans = self._span_candidates()
        first = [c for c in spans if c.first]
        if first:
            return [], [min(first, key=lambda c: c.row.order)]
        if getattr(self.engine, "vocoder_batched", False):
            rows = [r for r, (_, _, _, solo) in whole.items() if not solo] or list(whole)[:1]
            pending = [policy.Finished(c, c.frames, _RUNNING_ORDER if c.finished is None else
                                       self._finished[c.row][1], 0) for c in spans]  # fmt: skip
            key = policy.next_vocode(pending)
            return rows, [key] if key is not None else []
        pending = [policy.Finished(row, _frames_estimate(len(f.codes), row.request.req.params.speed), order, passed)
                   for row, (f, order, passed, _) in whole.items()]  # fmt: skip
        for c in spans:
            order, passed = (_RUNNING_ORDER, 0) if c.finished is None else self._finished[c.row][1:3]
            pending.append(policy.Finished(c, c.frames, order, passed))
        key = policy.next_vocode(pending)
        if key is None:
            return [], []
        return ([], [key]) if isinstance(key, _Span) else ([key], [])

    def _in_spans(self, row: _Row) -> bool:
        """Is this finished row vocoded span by span (streamed, or vocoder_span_s set) rather than whole?"""
        return row.request.streamed or self._span_cap is not None

    def _span_candidates(self) -> list[_Span]:
        """Spans of streamed rows the vocoder could take now: the current segment's next span (once that many
        frames are settled, or its row finished), and any finished later segment whole."""
        out = []
        rows = [r for r in self._running if r.request.streamed] + [r for r in self._finished if self._in_spans(r)]
        for row in rows:
            request = row.request
            if request.finished:
                continue
            if not request.streamed:  # a finished row vocoded in spans of at most vocoder_span_s
                f = self._finished[row][0]
                vocoder = request.vocoders.get(row.index)
                if vocoder is None:
                    vocoder = request.vocoders[row.index] = self.engine.row_vocoder(self._segment(row))
                frames = min(vocoder.ready(len(f.latents), final=True), self._span_cap)
                out.append(_Span(row, vocoder, f, self._span_cap, frames, False, False))
                continue
            current = row.index == request.joiner.current
            finished = self._finished[row][0] if row in self._finished else None
            if finished is None and not current:
                continue
            vocoder = request.vocoders.get(row.index)
            if vocoder is None:
                vocoder = request.vocoders[row.index] = self.engine.row_vocoder(self._segment(row))
            # The current segment's spans grow from STREAM_FIRST_CHUNK_S; a finished later segment goes in spans
            # of at most vocoder_span_s, as any finished row (None: whole).
            limit = request.span_frames if current else self._span_cap
            if finished is not None:
                ready = vocoder.ready(len(finished.latents), final=True)
                frames = ready if limit is None else min(ready, limit)
            else:
                ready = vocoder.ready(self._tokens.get(row, 0), final=False)
                if ready < limit:
                    continue
                frames = limit
            out.append(_Span(row, vocoder, finished, limit, frames, current and request.joiner.given == 0, current))
        return out


# A span of a row still decoding counts as finishing after every row that has finished (policy.next_vocode).
_RUNNING_ORDER = 1 << 62


@dataclass(frozen=True, eq=False)
class _Span:
    """A span of a streamed row for the vocoder: of a row still decoding when `finished` is None."""

    row: _Row
    vocoder: object  # batching.vocoder.RowVocoder
    finished: object | None  # batching.running.FinishedRow
    max_frames: int | None  # None: the rest of the row (vocoded whole)
    frames: int  # about how many frames it gives (the policy's length)
    first: bool  # it gives its request's first audio
    grows: bool  # the current segment's span of a streamed request: the next one is twice as long


def _frames_estimate(tokens: int, speed: float) -> int:
    """About how many vocoder frames a row of `tokens` audio tokens gives (XTTS: 1024 samples per token at
    22050 Hz, 256 per frame at 24000 Hz), to compare whole rows with spans."""
    return round(tokens * 4 * 24000 / 22050 / max(speed, 0.05))
