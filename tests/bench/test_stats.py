"""Percentiles, summaries, ratios and Prometheus deltas of the load report."""

from __future__ import annotations

import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from bench.stats import (
    Snapshot,
    counter_delta,
    hit_rate,
    histogram_delta,
    percentile,
    rate,
    ratio,
    summarize,
)


def test_percentile_interpolates_like_numpy():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 17, 100):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_small_cases():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 0], 95) == pytest.approx(9.5)  # order of input does not matter
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summarize_skips_missing_values():
    s = summarize([1.0, None, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p95"] == pytest.approx(3.85) and s["p99"] == pytest.approx(3.97)
    assert summarize([None])["p50"] is None and summarize([])["n"] == 0


def test_ratio_and_rate():
    assert ratio(6.0, 2.0) == 3.0
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    assert ratio(0.0, 2.0) == 0.0
    assert rate(10, 4) == 2.5 and rate(1, 0) is None
    assert hit_rate(3, 1) == 0.75 and hit_rate(0, 0) is None


def _registry():
    registry = CollectorRegistry()
    hits = Counter("xtts_cache_hits_total", "h", ["cache"], registry=registry)
    batch = Histogram("xtts_batch_size_rows", "b", buckets=(1, 2, 4, 8), registry=registry)
    stage = Histogram("xtts_stage_duration_seconds", "s", ["stage"], buckets=(0.1, 1.0), registry=registry)
    return registry, hits, batch, stage


def test_counter_and_histogram_deltas_between_scrapes():
    registry, hits, batch, stage = _registry()
    hits.labels(cache="latents").inc(5)
    batch.observe(1)
    stage.labels(stage="upload").observe(0.05)
    before = Snapshot.parse(generate_latest(registry).decode())
    hits.labels(cache="latents").inc(3)
    for size in (1, 2, 3, 8, 8):
        batch.observe(size)
    stage.labels(stage="upload").observe(0.5)
    stage.labels(stage="download").observe(2.0)
    after = Snapshot.parse(generate_latest(registry).decode())

    assert counter_delta(before, after, "xtts_cache_hits_total", cache="latents") == 3
    assert counter_delta(before, after, "xtts_cache_hits_total", cache="reference_audio") == 0
    h = histogram_delta(before, after, "xtts_batch_size_rows")
    assert h["count"] == 5 and h["sum"] == 22 and h["mean"] == 4.4
    # per-bucket counts, not cumulative: 1 -> "1", 2 -> "2", 3 -> "4", 8 and 8 -> "8"
    assert h["buckets"] == {"1": 1, "2": 1, "4": 1, "8": 2}
    up = histogram_delta(before, after, "xtts_stage_duration_seconds", stage="upload")
    assert up["count"] == 1 and up["buckets"] == {"1": 1}
    assert histogram_delta(before, after, "xtts_stage_duration_seconds", stage="download")["buckets"] == {"+Inf": 1}
    empty = histogram_delta(after, after, "xtts_batch_size_rows")
    assert empty == {"count": 0, "sum": 0.0, "mean": None, "buckets": {}}
