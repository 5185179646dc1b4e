"""Backoff and the retry loop, with a hand-moved clock: no real sleeping except the one deadline test."""

from __future__ import annotations

import asyncio
import time

import pytest

from storage import RefAudioNotFoundError, RetryPolicy, StorageUnavailableError
from storage.retry import Transient, call_with_retries, http_status_transient


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _run(operation, policy, fake: FakeTime, unit_random=lambda: 0.5):
    return call_with_retries(operation, policy, "download of gs://b/o", clock=fake.clock, sleep=fake.sleep,
                             unit_random=unit_random)


def test_backoff_is_full_jitter_under_an_exponential_ceiling():
    policy = RetryPolicy(base_s=0.5, max_backoff_s=4.0)
    ceilings = [policy.backoff_s(i, 1.0) for i in range(6)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.backoff_s(2, 0.0) == 0.0
    assert policy.backoff_s(2, 0.25) == 0.5
    assert policy.backoff_s(0, 0.0, retry_after_s=3.0) == 3.0
    assert policy.backoff_s(0, 0.0, retry_after_s=60.0) == 4.0  # capped


@pytest.mark.parametrize(("status", "transient"), [
    (408, True), (429, True), (500, True), (502, True), (503, True), (599, True),
    (400, False), (401, False), (403, False), (404, False), (410, False), (200, False), (302, False),
])
def test_transient_statuses(status, transient):
    assert http_status_transient(status) is transient


async def test_transient_faults_are_retried_until_success():
    fake = FakeTime()
    calls = []

    async def operation():
        calls.append(fake.now)
        if len(calls) < 3:
            raise Transient("HTTP 503")
        return "done"

    assert await _run(operation, RetryPolicy(max_retries=5, base_s=1.0, max_backoff_s=10.0), fake) == "done"
    assert fake.sleeps == [0.5, 1.0]  # 0.5 * min(10, 1 * 2**i)


async def test_final_errors_are_not_retried():
    fake = FakeTime()
    calls = []

    async def operation():
        calls.append(1)
        raise RefAudioNotFoundError("reference audio not found: gs://b/o")

    with pytest.raises(RefAudioNotFoundError):
        await _run(operation, RetryPolicy(), fake)
    assert len(calls) == 1 and fake.sleeps == []


async def test_retry_count_is_bounded_and_the_error_says_what_happened():
    fake = FakeTime()
    calls = []

    async def operation():
        calls.append(1)
        raise Transient("HTTP 500")

    with pytest.raises(StorageUnavailableError) as info:
        await _run(operation, RetryPolicy(max_retries=3, base_s=0.1, deadline_s=1000), fake)
    assert len(calls) == 4 and len(fake.sleeps) == 3
    message = str(info.value)
    assert "download of gs://b/o failed after 4 attempts" in message and "HTTP 500" in message
    assert info.value.retryable and info.value.error_code == "storage_unavailable"


async def test_deadline_stops_retries_before_sleeping_past_it():
    fake = FakeTime()

    async def operation():
        fake.now += 1.0  # each attempt takes one second
        raise Transient("HTTP 503")

    policy = RetryPolicy(max_retries=100, base_s=1.0, max_backoff_s=2.0, deadline_s=6.0)
    with pytest.raises(StorageUnavailableError):
        await _run(operation, policy, fake, unit_random=lambda: 1.0)
    assert fake.now <= 6.0
    assert fake.sleeps == [1.0, 2.0]  # 1+1, +1+2 = 5; the next (1 s attempt + 2 s sleep) would pass 6


async def test_server_retry_after_is_honoured():
    fake = FakeTime()
    calls = []

    async def operation():
        calls.append(1)
        if len(calls) == 1:
            raise Transient("HTTP 429", retry_after_s=2.0)
        return "ok"

    assert await _run(operation, RetryPolicy(base_s=0.1, max_backoff_s=5.0), fake) == "ok"
    assert fake.sleeps == [2.0]


async def test_a_hung_attempt_is_cut_at_the_deadline():
    async def operation():
        await asyncio.Event().wait()

    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="deadline"):
        await call_with_retries(operation, RetryPolicy(deadline_s=0.2), "download of gs://b/o")
    assert time.monotonic() - started < 5.0


async def test_timeouts_raised_inside_the_operation_are_not_mistaken_for_the_deadline():
    async def operation():
        raise TimeoutError("a bug, not the deadline")

    with pytest.raises(TimeoutError, match="a bug"):
        await call_with_retries(operation, RetryPolicy(deadline_s=100), "x")
