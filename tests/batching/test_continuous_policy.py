"""Continuous scheduling's policy with hand-built queues: which rows join the running batch at a step boundary,
which finished row the vocoder takes next. No clock, no model."""

import pytest

from batching.policy import (Batch, Finished, Idle, Running, WaitUntil, Waiting, next_admission, next_vocode,
                             preempt)


def admission(waiting, now=1.0, rows=0, span=0, max_rows=4, positions=10_000, wait=0.05):
    return next_admission(waiting, now, running_rows=rows, running_span=span, max_rows=max_rows,
                          max_positions=positions, batch_wait_s=wait)  # fmt: skip


def r(key, positions=100, at=0.0):
    return Waiting(key=key, voice="a", length=10, enqueued_at=at, order=key, positions=positions)


def test_admission_nothing_waiting_is_idle():
    assert admission([]) == Idle()


def test_an_idle_engine_waits_for_company_but_a_running_batch_takes_arrivals_at_once():
    assert admission([r(1, at=0.99)], now=1.0) == WaitUntil(pytest.approx(1.04))
    assert admission([r(1, at=0.99)], now=1.0, rows=2, span=100) == Batch((1,))


def test_an_idle_engine_does_not_wait_for_company_that_would_not_fit():
    assert admission([r(1, 600, 0.99), r(2, 600, 0.99)], now=1.0, positions=1000) == Batch((1,))


def test_admission_is_oldest_first_within_the_row_budget():
    waiting = [r(3, at=0.3), r(1, at=0.1), r(2, at=0.2), r(4, at=0.4)]
    assert admission(waiting, rows=2, span=100, max_rows=4) == Batch((1, 2))
    assert admission(waiting, rows=4, span=100, max_rows=4) == Batch(())


def test_the_kv_budget_counts_rows_times_the_widest_reservation():
    # 2 running rows of 100; a row of 300 makes it 3 x 300 = 900 <= 1000; one more would be 4 x 300.
    waiting = [r(1, 300, 0.1), r(2, 50, 0.2)]
    assert admission(waiting, rows=2, span=100, positions=1000) == Batch((1,))
    assert admission(waiting, rows=2, span=100, positions=1200) == Batch((1, 2))


def test_a_row_that_does_not_fit_holds_younger_ones_back_so_it_is_never_starved():
    waiting = [r(1, 600, 0.1), r(2, 10, 0.2), r(3, 10, 0.3)]
    assert admission(waiting, rows=1, span=100, positions=1000) == Batch(())


def test_a_row_larger_than_the_whole_budget_runs_alone_when_nothing_runs():
    assert admission([r(1, 5000), r(2, 10)], positions=1000) == Batch((1,))


def test_admission_budgets_are_checked():
    with pytest.raises(ValueError, match="max_rows must be an integer >= 1, got 0"):
        admission([r(1)], max_rows=0)
    with pytest.raises(ValueError, match="max_positions must be an integer >= 1, got 0"):
        admission([r(1)], positions=0)


def test_the_shortest_finished_row_is_vocoded_first_unless_one_was_passed_over_too_often():
    assert next_vocode([]) is None
    pending = [Finished("long", 300, 0, 0), Finished("short", 20, 1, 0), Finished("mid", 90, 2, 0)]
    assert next_vocode(pending) == "short"
    pending[0] = Finished("long", 300, 0, 4)
    assert next_vocode(pending, max_passes=4) == "long"


def test_a_streamed_requests_later_segments_wait_for_other_streams_first_segments():
    """`due` orders admission (when the audio is needed); arrival still decides the wait for company."""
    a1 = Waiting("a1", "v", 10, enqueued_at=0.0, order=1, positions=10, due=5.0)  # A's 2nd segment, needed at 5 s
    b0 = Waiting("b0", "v", 10, enqueued_at=1.0, order=2, positions=10)
    c1 = Waiting("c1", "v", 10, enqueued_at=1.0, order=3, positions=10, due=1.5)
    decision = next_admission([a1, b0, c1], 2.0, running_rows=0, running_span=0, max_rows=2, max_positions=100,
                              batch_wait_s=0.0)  # fmt: skip
    assert decision == Batch(("b0", "c1"))
    # Nothing runs and every segment fits: wait for company from the earliest arrival, not the earliest due time.
    decision = next_admission([a1], 0.01, running_rows=0, running_span=0, max_rows=2, max_positions=100,
                              batch_wait_s=0.05)  # fmt: skip
    assert decision == WaitUntil(0.05)


def starter(key, at):
    return Waiting(key, "v", 10, enqueued_at=at, order=at, positions=10, starts_stream=True)


def test_a_waiting_first_segment_takes_the_row_of_the_later_segment_needed_last():
    """Two first segments of streams wait, no row is free: the two running later segments needed latest (and
    least decoded among equals) go back to the queue; one needed within min_lead_s of the starters' arrival, and
    a row that is not a later segment of a stream (due None), stay."""
    running = [Running("soon", due=11.0, decoded=5), Running("late", due=30.0, decoded=50),
               Running("later", due=40.0, decoded=900), Running("tie", due=30.0, decoded=10),
               Running("plain", due=None, decoded=0)]  # fmt: skip
    waiting = [starter("s1", 9.0), starter("s2", 9.5)]
    assert preempt(waiting, running, free_rows=0, min_lead_s=2.0) == ("later", "tie")
    # One row is free: it goes to the first starter (by rank); the second takes one row.
    assert preempt(waiting, running, free_rows=1, min_lead_s=2.0) == ("later",)
    assert preempt(waiting, running, free_rows=2, min_lead_s=2.0) == ()
    # Only rows needed at least min_lead_s after the starter's arrival.
    assert preempt([starter("s", 9.5)], [Running("soon", due=11.0, decoded=5)], free_rows=0, min_lead_s=2.0) == ()
    assert preempt([starter("s", 9.0)], [Running("soon", due=11.0, decoded=5)], free_rows=0, min_lead_s=2.0) == (
        "soon",)
    assert preempt([starter("s3", 38.0)], running, free_rows=0, min_lead_s=2.0) == ("later",)
    assert preempt([starter("s3", 38.5)], running, free_rows=0, min_lead_s=2.0) == ()
    assert preempt([starter("s3", 45.0)], running, free_rows=0, min_lead_s=2.0) == ()


def test_only_first_segments_of_streams_preempt_and_only_when_admission_leaves_them_out():
    running = [Running("late", due=30.0, decoded=50)]
    plain = Waiting("p", "v", 10, enqueued_at=1.0, order=1, positions=10)
    later = Waiting("l", "v", 10, enqueued_at=1.0, order=2, positions=10, due=3.0)
    assert preempt([plain, later], running, free_rows=0, min_lead_s=2.0) == ()
    # The free row goes to `plain` (older than the starter): the starter is left without one, so it preempts.
    assert preempt([plain, starter("s", 4.0)], running, free_rows=1, min_lead_s=2.0) == ("late",)
    assert preempt([starter("s", 4.0)], running, free_rows=1, min_lead_s=2.0) == ()
    assert preempt([], running, free_rows=0, min_lead_s=2.0) == ()
    with pytest.raises(ValueError, match="free_rows"):
        preempt([], running, free_rows=-1, min_lead_s=2.0)
