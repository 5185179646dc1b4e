"""The arithmetic of a load report: percentiles, summaries, ratios, Prometheus snapshots and their deltas.

Pure Python (no numpy, no torch) so the load generator stays light next to the worker it measures.

Percentiles interpolate linearly between the two nearest ranks (numpy's default, "type 7"): with values
v[0] <= ... <= v[n-1], percentile q sits at rank h = (n - 1) * q / 100 and is v[floor h] + (h - floor h) *
(v[floor h + 1] - v[floor h]). With few samples p99 is close to the maximum: the report gives n beside them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        return None
    h = (len(data) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (h - lo) * (data[hi] - data[lo])


def summarize(values: Iterable[float | None], digits: int = 4) -> dict[str, Any]:
    """n, mean, p50, p95, p99, min, max of the values that are not None (None entries when there are none)."""
    data = [float(v) for v in values if v is not None]
    if not data:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "min": None, "max": None}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(data),
        "mean": r(statistics.fmean(data)),
        "p50": r(percentile(data, 50)),
        "p95": r(percentile(data, 95)),
        "p99": r(percentile(data, 99)),
        "min": r(min(data)),
        "max": r(max(data)),
    }


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)


def rate(amount: float, seconds: float, digits: int = 4) -> float | None:
    """amount per second, None for a zero-length interval."""
    return round(amount / seconds, digits) if seconds > 0 else None


# ------------------------------------------------------------------------------------------ Prometheus


def _key(name: str, labels: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@dataclass
class Snapshot:
    """One scrape of a Prometheus text endpoint: every sample by (name, sorted labels)."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[_key(sample.name, sample.labels)] = float(sample.value)
        return cls(samples)

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        return self.samples.get(_key(name, labels), default)

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample of `name`, by its labels."""
        return {labels: value for (n, labels), value in self.samples.items() if n == name}

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


def counter_delta(before: Snapshot, after: Snapshot, name: str, **labels: str) -> float:
    """How much a counter (or a histogram's _sum/_count) grew between two scrapes of the same process."""
    return after.get(name, **labels) - before.get(name, **labels)


def histogram_delta(before: Snapshot, after: Snapshot, name: str, **labels: str) -> dict[str, Any]:
    """A histogram's observations between two scrapes: count, sum, mean, and the count in each bucket
    (`le` upper bounds, not cumulative: "2" holds observations in (1, 2])."""
    count = counter_delta(before, after, f"{name}_count", **labels)
    total = counter_delta(before, after, f"{name}_sum", **labels)
    cumulative = []
    for label_items, value in after.series(f"{name}_bucket").items():
        label_map = dict(label_items)
        le = label_map.pop("le", None)
        if le is None or label_map != labels:
            continue
        previous = before.get(f"{name}_bucket", le=le, **labels)
        cumulative.append((math.inf if le == "+Inf" else float(le), le, value - previous))
    cumulative.sort()
    buckets, prior = {}, 0.0
    for _bound, le, value in cumulative:
        in_bucket = value - prior
        prior = value
        if in_bucket > 0:
            buckets[_le_label(le)] = int(round(in_bucket))
    return {
        "count": int(round(count)),
        "sum": round(total, 4),
        "mean": round(total / count, 4) if count > 0 else None,
        "buckets": buckets,
    }


def _le_label(le: str) -> str:
    if le == "+Inf":
        return "+Inf"
    value = float(le)
    return str(int(value)) if value.is_integer() else le


def hit_rate(hits: float, misses: float) -> float | None:
    total = hits + misses
    return round(hits / total, 4) if total > 0 else None

