"""Retry with exponential backoff and full jitter, bounded by a count and an overall deadline.

An operation signals "worth another try" by raising `Transient`; any other exception ends the loop at once.
`http_status_transient` says which statuses are transient (408, 429, 5xx). The clock, the sleep and the random
source are parameters so tests move time by hand.

An optional `RetryObserver` hears each retry (`retried(reason)`: `429`, `5xx`, `timeout`, `connection`) and each
final failure (`failed(reason)`: the error's `error_code`, e.g. `storage_unavailable`, `ref_audio_not_found`);
the worker feeds `xtts_storage_retries_total` and `xtts_storage_errors_total` from it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .errors import StorageUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Transient(Exception):
    """A fault worth retrying. `description` is safe to print (no URL query); `retry_after_s` from the server;
    `reason` is its class for metrics: `429`, `5xx`, `timeout` or `connection`."""

    def __init__(self, description: str, retry_after_s: float | None = None, *, reason: str = "connection") -> None:
        super().__init__(description)
        self.description = description
        self.retry_after_s = retry_after_s
        self.reason = reason


def status_reason(status: int) -> str:
    """The metrics reason of a transient HTTP status: 429, timeout (408) or 5xx."""
    return "429" if status == 429 else "timeout" if status == 408 else "5xx"


class RetryObserver(Protocol):
    def retried(self, reason: str) -> None: ...

    def failed(self, reason: str) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    base_s: float = 0.5
    max_backoff_s: float = 10.0
    deadline_s: float = 120.0

    def backoff_s(self, retry_index: int, unit_random: float, retry_after_s: float | None = None) -> float:
        """Delay before retry number `retry_index` (0-based): uniform in [0, min(cap, base * 2**i)], raised to
        the server's Retry-After (itself capped at `max_backoff_s`)."""
        ceiling = min(self.max_backoff_s, self.base_s * (2 ** min(retry_index, 62)))
        delay = unit_random * ceiling
        if retry_after_s is not None and retry_after_s > 0:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay


def http_status_transient(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    unit_random: Callable[[], float] = random.random,
    observer: RetryObserver | None = None,
) -> T:
    """Run `operation` until it returns, raises a non-`Transient` error, or the budget is spent.

    Each attempt runs under the time left to the deadline. A spent budget raises `StorageUnavailableError` that
    names `what`, the number of attempts, the time taken and the last fault. `observer` hears every retry and the
    final failure (a spent budget, or any error with an `error_code` that ends the loop).
    """
    try:
        return await _retry_loop(operation, policy, what, clock, sleep, unit_random, observer)
    except Exception as exc:
        code = getattr(exc, "error_code", None)
        if observer is not None and isinstance(code, str):
            observer.failed(code)
        raise


async def _retry_loop(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[object]],
    unit_random: Callable[[], float],
    observer: RetryObserver | None,
) -> T:
    start = clock()
    attempts = 0
    last = "no attempt finished"
    while True:
        remaining = policy.deadline_s - (clock() - start)
        if remaining <= 0:
            break
        attempts += 1
        try:
            async with asyncio.timeout(remaining) as scope:
                return await operation()
        except Transient as fault:
            last = fault.description
            retry_after = fault.retry_after_s
            reason = fault.reason
        except TimeoutError:
            if not scope.expired():
                raise
            last = f"did not finish within the {policy.deadline_s:g} s deadline"
            break
        if attempts > policy.max_retries:
            break
        delay = policy.backoff_s(attempts - 1, unit_random(), retry_after)
        if clock() - start + delay >= policy.deadline_s:
            break
        log.warning("%s: %s; retry %d/%d in %.2f s", what, last, attempts, policy.max_retries, delay)
        if observer is not None:
            observer.retried(reason)
        await sleep(delay)
    elapsed = clock() - start
    raise StorageUnavailableError(
        f"{what} failed after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s"
        f" (last error: {last})"
    )
