"""The report writer: JSON, Markdown and PNG from one report dict (no worker)."""

from __future__ import annotations

import json

from bench.load import RunRecord
from bench.report import markdown, write_report
from bench.summary import compare_points


def _point(label, concurrency, thr, p95, mode="closed"):
    return {
        "label": label, "mode": mode, "concurrency": concurrency, "rate": None, "jobs": 16, "completed": 16,
        "errors": 0, "error_kinds": {}, "error_samples": [], "wall_s": 10.0, "chars": 500, "audio_s": 10 * thr,
        "jobs_per_s": 1.6, "chars_per_s": 50.0, "audio_s_per_s": thr, "rtf": 1 / thr,
        "latency_s": {"n": 16, "mean": p95 / 2, "p50": p95 / 2, "p95": p95, "p99": p95 * 1.1, "min": 0.1, "max": p95},
        "platform_queue_s": {"p50": 0.5}, "queue_wait_s": {"p50": 0.1}, "synthesis_s": {"p50": 1.0},
        "worker_total_s": {"p50": 1.2}, "execution_s": {"p50": None}, "job_batch_sizes": {"4": 16},
        "latent_cache_hit_rate_jobs": 0.9, "reference_cache_hit_rate_jobs": 0.95,
        "worker_metrics": {"batch_size_rows": {"count": 4, "sum": 16, "mean": 4.0, "buckets": {"4": 4}},
                           "caches": {"latents": {"hits": 15, "misses": 1, "hit_rate": 0.9375},
                                      "reference_audio": {"hits": 14, "misses": 2, "hit_rate": 0.875}},
                           "stages": {}, "jobs": {"completed": 16}, "audio_seconds": 10 * thr,
                           "real_time_factor_mean": 0.5, "gpu_memory_bytes": None},
        "peak_rss_mb": 1234.5,
    }  # fmt: skip


def _report():
    base = RunRecord("baseline", "baseline", settings={"MAX_CONCURRENCY": "1", "LATENT_CACHE_DIR": ""},
                     worker={"start_s": 20.0, "rss_after_warmup_mb": 1000.0, "peak_rss_mb": 1100.0, "exit_status": 0},
                     points=[_point("closed@c1", 1, 0.5, 4.0), _point("closed@c16", 16, 0.5, 40.0)])  # fmt: skip
    batched = RunRecord("batched", "batched", settings={"MAX_CONCURRENCY": "32"},
                        worker={"start_s": 20.0, "peak_rss_mb": 1300.0, "exit_status": 0},
                        points=[_point("closed@c1", 1, 0.8, 3.0), _point("closed@c16", 16, 2.0, 10.0)])
    soak = _point("soak@c16", 16, 2.0, 10.0, mode="soak")
    soak["rss"] = {"interval_s": 1.0, "warmup_jobs": 10, "after_warmup_mb": 1200.0, "end_mb": 1210.0,
                   "growth_mb": 10.0, "growth_pct": 0.83, "series_s_mb": [[0, 1200.0], [1, 1205.0], [2, 1210.0]]}
    batched.soak = soak
    runs = [base.as_dict(), batched.as_dict()]
    return {
        "name": "unit", "date": "2026-01-01 00:00 UTC", "duration_s": 100.0, "interrupted": False,
        "command": "python -m bench --jobs 16", "target": "local",
        "machine": {"cpu_model": "Test CPU", "cpu_logical_cores": 2, "cpu_physical_cores": 2, "ram_gib": 24},
        "git": None, "model": {"description": "demo tiny checkpoint (random weights)"}, "device": "cpu",
        "workload": {"seed": 0, "voices": 8, "offered": {"jobs": 32}},
        "configs": {r["run"]: r["settings"] for r in runs},
        "ratios": [compare_points(runs[1], runs[0])], "gcs_latency_comparison": [], "runs": runs,
        "notes": ["baseline emulates the seed"], "errors_total": 0, "faults_injected": False,
    }  # fmt: skip


def test_write_report_writes_json_markdown_and_png(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path / "out", "unit")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"unit.json", "unit.md", "unit.png"}
    assert json.loads(paths["json"].read_text()) == report
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert md == markdown(report)


def test_markdown_has_the_facts_tables_and_ratios():
    md = markdown(_report())
    assert "Test CPU, 2 logical / 2 physical cores" in md and "`python -m bench --jobs 16`" in md
    assert "| baseline | MAX_CONCURRENCY=1, LATENT_CACHE_DIR='' |" in md
    assert "| batched | closed@c16 | 16 | 16 | 0 |" in md
    # batched / baseline at c16: 2.0 / 0.5 audio-s/s = 4x; p95 10 / 40 = 0.25x
    assert "| closed@c16 | 4.00x | 1.00x | 1.00x | 0.25x | 0.25x | 0.25x | NO |" in md
    assert "1200.0 MB** after the first 10 jobs" in md and "**10.0 MB** (0.83%)" in md
    assert "- baseline emulates the seed" in md


def test_report_without_points_still_renders(tmp_path):
    report = _report()
    for run in report["runs"]:
        run["points"], run["soak"] = [], None
    report["ratios"] = []
    paths = write_report(report, tmp_path, "empty")
    assert paths["png"].is_file() and "## Results" in paths["md"].read_text()
