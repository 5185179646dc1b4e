"""The batch policy with hand-built queues: no clock, no model."""

import pytest

from batching.policy import Batch, Idle, WaitUntil, Waiting, next_batch


def w(key, voice="a", length=10, at=0.0):
    return Waiting(key=key, voice=voice, length=length, enqueued_at=at, order=key)


def plan(waiting, now=1.0, size=4, wait=0.05):
    return next_batch(waiting, now, max_batch_size=size, batch_wait_s=wait)


def test_nothing_waiting_is_idle():
    assert plan([]) == Idle()


def test_waits_for_company_until_the_oldest_has_waited_long_enough():
    assert plan([w(1, at=0.98), w(2, at=0.99)], now=1.0) == WaitUntil(pytest.approx(1.03))


def test_runs_when_the_oldest_has_waited_the_wait_cap():
    assert plan([w(1, at=0.95), w(2, at=0.99)], now=1.0) == Batch((1, 2))


def test_a_full_batch_runs_at_once():
    waiting = [w(i, at=0.999) for i in range(4)]
    assert plan(waiting, now=1.0) == Batch((0, 1, 2, 3))


def test_size_cap():
    waiting = [w(i, at=0.0) for i in range(10)]
    batch = plan(waiting, size=4)
    assert batch == Batch((0, 1, 2, 3))


def test_same_voice_first_around_the_oldest():
    waiting = [w(1, "a", at=0.1), w(2, "b", at=0.0), w(3, "b", at=0.2), w(4, "a", at=0.3), w(5, "b", at=0.4)]
    assert plan(waiting, size=3) == Batch((2, 3, 5))


def test_spare_rows_are_filled_with_other_voices_closest_in_length():
    waiting = [w(1, "a", 20, 0.0), w(2, "b", 200, 0.1), w(3, "c", 25, 0.2), w(4, "d", 18, 0.3), w(5, "a", 22, 0.4)]
    assert plan(waiting, size=4) == Batch((1, 5, 4, 3))


def test_the_oldest_segment_is_never_passed_over():
    # Many rows of voice "b" keep arriving, but the old lone "a" row is the anchor of the next batch.
    waiting = [w(0, "a", 500, 0.0)] + [w(i, "b", 10, 0.5 + i / 100) for i in range(1, 20)]
    assert 0 in plan(waiting, size=4).keys


def test_ties_are_broken_by_arrival_order():
    waiting = [w(3, at=0.0), w(1, at=0.0), w(2, at=0.0)]
    assert plan(waiting, size=2) == Batch((1, 2))


def test_zero_wait_runs_a_lone_segment_at_once():
    assert plan([w(1, at=1.0)], now=1.0, wait=0.0) == Batch((1,))


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        plan([w(1)], size=0)
