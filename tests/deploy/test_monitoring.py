"""deploy/: the Prometheus alert rules (checked and unit-tested with promtool), the scrape configuration and the
Grafana dashboard. Every metric they name is in the README's Metrics section and in a live scrape of the worker's
metrics server (server.metrics, started here in-process on 127.0.0.1, fed through the same hooks the worker uses).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics, MetricsServer, SchedulerMetrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
SCRAPE = PROMETHEUS / "scrape.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "xtts-worker.json"
README = (REPO / "README.md").read_text(encoding="utf-8")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; scripts/setup.sh installs it)"
)
# Series Prometheus writes itself, not the worker.
PROMETHEUS_SERIES = {"up"}
_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules():
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_check_the_scrape_config():
    result = promtool("check", "config", str(SCRAPE))
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_is_tested_firing_and_quiet():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            cases.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    for rule in alert_rules():
        assert cases.get(rule["alert"]) == {True, False}, f"{rule['alert']}: needs a firing and a quiet test case"
    expected = {"XttsWorkerDown", "XttsJobErrorRateHigh", "XttsQueueBacklog", "XttsQueueWaitHigh",
                "XttsGpuMemoryNearLimit", "XttsStorageErrors", "XttsJobsStalled"}  # fmt: skip
    assert {rule["alert"] for rule in alert_rules()} == expected


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def series_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers followed by a selector, plus every xtts_* identifier."""
    named = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)) | set(re.findall(r"\bxtts_[a-z0-9_]+", expr))
    return named


def test_the_dashboard_is_sound():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 10
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.fixture(scope="module")
def live_scrape() -> set[str]:
    """Sample names served by the worker's metrics server, after one of everything it records."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    hooks = SchedulerMetrics(metrics)
    metrics.record_job("completed", "pt", 1.5)
    metrics.record_job("failed", "en", 0.2)
    for stage in ("download", "queue_wait", "generation", "encode", "upload"):
        metrics.observe_stage(stage, 0.1)
    hooks.batch_done(4, 0.8, 120)
    hooks.queue_depth(3)
    hooks.conditioning_done(0.3, hit=False)
    hooks.vocoder_done(0.2)
    metrics.record_cache("reference_audio", True)
    metrics.cache_bytes.labels(cache="reference_audio").set(1000)
    metrics.jobs_in_flight.inc()
    metrics.record_audio(3.0, 1.0)
    metrics.storage_retries.labels(reason="transient").inc()
    metrics.storage_errors.labels(reason="unavailable").inc()
    metrics.update_gpu_memory(_fake_torch(allocated=10, reserved=20))
    metrics.set_engine("batched", "cpu", "per_row")
    server = MetricsServer.start(0, registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _fake_torch(allocated: int, reserved: int) -> types.SimpleNamespace:
    cuda = types.SimpleNamespace(is_available=lambda: True, memory_allocated=lambda: allocated,
                                 memory_reserved=lambda: reserved)  # fmt: skip
    return types.SimpleNamespace(cuda=cuda)


def _readme_metrics_section() -> str:
    start = README.index("\n## Metrics")
    return README[start : README.index("\n## ", start + 5)]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_named_is_documented_and_exported(source, live_scrape):
    exprs = [rule["expr"] for rule in alert_rules()] if source == "alerts" else dashboard_exprs()
    names = set().union(*(series_names(expr) for expr in exprs))
    assert names, source
    section = _readme_metrics_section()
    for name in sorted(names - PROMETHEUS_SERIES):
        assert name.startswith("xtts_"), f"{source} names {name!r}, which is neither the worker's nor Prometheus's"
        family = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
        assert f"`{family}" in section, f"{source}: {family} is not in the README's Metrics section"
        assert name in live_scrape, f"{source}: {name} is not served by the worker's metrics endpoint"


def test_the_gpu_memory_gauge_follows_each_batch(monkeypatch):
    """The GPU alert reads xtts_gpu_memory_bytes: it must move while the worker runs, not only at start."""
    metrics = Metrics(CollectorRegistry())
    fake = _fake_torch(allocated=5, reserved=7)
    monkeypatch.setitem(sys.modules, "torch", fake)
    SchedulerMetrics(metrics).batch_done(2, 0.1, 10)
    assert metrics.registry.get_sample_value("xtts_gpu_memory_bytes", {"kind": "reserved"}) == 7
    fake.cuda.memory_reserved = lambda: 9
    SchedulerMetrics(metrics).batch_done(2, 0.1, 10)
    assert metrics.registry.get_sample_value("xtts_gpu_memory_bytes", {"kind": "reserved"}) == 9
