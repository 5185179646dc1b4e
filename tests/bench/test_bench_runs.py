"""`python -m bench` end to end, in subprocesses, on the tiny demo checkpoint (slow: each starts real workers).

- endpoint target against the SDK's local test API (`python -m server --rp_serve_api`, local storage);
- local target: emulator + fake RunPod + a worker per configuration, a report with ratios;
- Ctrl-C: everything it started is gone; --device cuda without CUDA: a clear error.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.stack import worker_base_env
from testing.loopback import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=worker_base_env({"PYTHONUNBUFFERED": "1"}))  # fmt: skip


@pytest.fixture
def local_test_api(tmp_path, tiny_checkpoint):
    """`python -m server --rp_serve_api` on a free port: tiny demo checkpoint, local storage under tmp_path."""
    port, metrics_port = free_port(), free_port()
    storage = tmp_path / "local_storage"
    (storage / "bench").mkdir(parents=True)
    env = worker_base_env({
        "XTTS_MODEL_DIR": str(tiny_checkpoint), "XTTS_DEVICE": "cpu", "STORAGE_BACKEND": "local",
        "LOCAL_STORAGE_DIR": str(storage), "GCS_BUCKET_NAME": "bench", "AUDIO_CACHE_DIR": str(tmp_path / "ac"),
        "LATENT_CACHE_DIR": str(tmp_path / "lc"), "METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "server", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    with ServerProcess(argv, log, env=env, cwd=REPO, what="the worker", stop_timeout_s=30) as worker:
        worker.wait_ready(f"http://127.0.0.1:{port}/openapi.json", 300)
        yield {"port": port, "metrics_port": metrics_port, "storage": storage, "pid": worker.pid, "log": log}


def test_endpoint_target_runs_against_the_local_test_api(local_test_api, tmp_path):
    api = local_test_api
    out = tmp_path / "results"
    common = ["endpoint", "--base-url", f"http://127.0.0.1:{api['port']}", "--endpoint-id", "local-test",
              "--jobs", "3", "--concurrencies", "1,3", "--warmup-jobs", "1",
              "--local-storage-dir", str(api["storage"]), "--out-dir", str(out)]  # fmt: skip
    done = _bench(*common, "--name", "ep", "--metrics-url", f"http://127.0.0.1:{api['metrics_port']}/metrics",
                  "--worker-pid", str(api["pid"]))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + api["log"].read_text()[-3000:]
    assert {p.name for p in out.iterdir()} == {"ep.json", "ep.md", "ep.png"}
    report = json.loads((out / "ep.json").read_text())
    assert report["target"] == "endpoint" and report["errors_total"] == 0
    # The local test API: routes without the endpoint id, POST /status (runpod 1.12's rp_fastapi.py).
    assert report["endpoint"]["layout"] == "flat" and report["endpoint"]["status_method"] == "post"
    (run,) = report["runs"]
    assert [p["label"] for p in run["points"]] == ["closed@c1", "closed@c3"]
    for point in run["points"]:
        assert (point["jobs"], point["completed"], point["errors"]) == (3, 3, 0)
        assert point["audio_s"] > 0 and point["latency_s"]["p50"] > 0 and point["audio_s_per_s"] > 0
        assert point["queue_wait_s"]["n"] == 3  # the worker's own account came back in each output
        assert point["worker_metrics"]["jobs"] == {"completed": 3}
        assert point["peak_rss_mb"] > 100
    assert all(j["status"] == "COMPLETED" and j["audio_s"] > 0 for j in run["jobs"])
    assert "| endpoint | closed@c3 | 3 | 3 | 0 |" in (out / "ep.md").read_text()

    # /runsync works too, and a second run offers the very same jobs.
    again = _bench(*common, "--name", "ep-sync", "--mode", "runsync")
    assert again.returncode == 0, again.stderr[-3000:]
    sync = json.loads((out / "ep-sync.json").read_text())
    assert sync["errors_total"] == 0 and sync["endpoint"]["mode"] == "runsync"
    texts = [(j["index"], j["chars"], j["voice"], j["audio_s"]) for j in run["jobs"]]
    assert [(j["index"], j["chars"], j["voice"], j["audio_s"]) for j in sync["runs"][0]["jobs"]] == texts


def test_local_target_baseline_beside_batched(tmp_path):
    out = tmp_path / "results"
    done = _bench("--concurrencies", "3", "--jobs", "3", "--voices", "2", "--warmup-jobs", "1",
                  "--configs", "baseline,unbatched,batched", "--out-dir", str(out), "--name", "local")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "local.json").read_text())
    assert [r["run"] for r in report["runs"]] == ["baseline", "unbatched", "batched"]
    baseline, unbatched, batched = report["runs"]
    for run in (baseline, unbatched):
        assert run["settings"]["LATENT_CACHE"] == "off" and run["settings"]["MAX_BATCH_SIZE"] == "1"
    assert batched["settings"]["MAX_BATCH_SIZE"] == "8"
    # The baseline ran the seed's decoding path; the others this worker's engine (from the worker's own metrics).
    engines = [r["points"][0]["worker_metrics"]["engine"] for r in report["runs"]]
    assert [e["engine"] for e in engines] == ["stock", "batched", "batched"]
    assert all(e["device"] == "cpu" and e["vocoder"] == "per_row" for e in engines)
    for run in report["runs"]:
        (point,) = run["points"]
        assert (point["completed"], point["errors"]) == (3, 0)
        assert run["worker"]["exit_status"] == 0 and run["worker"]["peak_rss_mb"] > 100
        assert not psutil.pid_exists(run["worker"]["pid"]) or psutil.Process(run["worker"]["pid"]).status() == "zombie"
    # The same work for all: same jobs, same audio.
    assert baseline["points"][0]["audio_s"] == unbatched["points"][0]["audio_s"] == batched["points"][0]["audio_s"]
    # The worker's vocoder stage (HiFi-GAN's share of each batch) is reported on every configuration.
    assert all(r["points"][0]["worker_metrics"]["stages"]["vocoder"]["count"] >= 1 for r in report["runs"])
    assert any(n.startswith("Vocoder (HiFi-GAN) time") and "batched closed@c3" in n for n in report["notes"])
    # The baseline really recomputed latents; batching really batched.
    assert baseline["points"][0]["worker_metrics"]["caches"]["latents"]["hits"] == 0
    assert baseline["points"][0]["worker_metrics"]["batch_size_rows"]["mean"] == 1.0
    pairs = [(r["numerator"], r["denominator"]) for r in report["ratios"]]
    assert pairs == [("unbatched", "baseline"), ("batched", "baseline"), ("batched", "unbatched")]
    assert all(r["points"][0]["audio_s_per_s"] > 0 and r["points"][0]["same_audio"] for r in report["ratios"])
    assert "| batched | closed@c3 | 3 | 3 | 0 |" in (out / "local.md").read_text()
    for key in ("date", "command", "machine", "model", "device", "configs"):
        assert report[key]
    assert (out / "local.png").stat().st_size > 10_000


def test_http_target_runs_the_http_mode_beside_the_queue_mode(tmp_path):
    """`python -m bench http`: a worker in SERVER_MODE=http (OpenAI speech requests, PCM streamed in the body)
    beside a queue worker with STREAMING=on, on the same jobs: both complete them with the same audio, and both
    report a time to first audio below their latency."""
    out = tmp_path / "results"
    done = _bench("http", "--concurrencies", "2", "--jobs", "2", "--voices", "2", "--warmup-jobs", "1",
                  "--texts", "paragraphs", "--max-chars", "160", "--out-dir", str(out), "--name", "http")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "http.json").read_text())
    assert [r["run"] for r in report["runs"]] == ["streaming", "http"] and report["errors_total"] == 0
    streaming, http = report["runs"]
    assert http["settings"]["SERVER_MODE"] == "http" and streaming["settings"]["STREAMING"] == "on"
    for run in (streaming, http):
        (point,) = run["points"]
        assert (point["completed"], point["errors"]) == (2, 0)
        assert 0 < point["first_audio_s"]["p50"] < point["latency_s"]["p50"]
        assert run["worker"]["exit_status"] == 0
    # The HTTP side's audio is counted from the PCM bytes, the queue side's from the result: the same audio.
    (ratio,) = [r for r in report["ratios"] if (r["numerator"], r["denominator"]) == ("http", "streaming")]
    assert ratio["points"][0]["same_audio"] and ratio["points"][0]["audio_s_per_s"] > 0
    # The HTTP worker batched the two requests' rows like the queue worker did (its own metrics).
    assert http["points"][0]["worker_metrics"]["jobs"] == {"completed": 2}
    text = (out / "http.md").read_text()
    assert "| http | closed@c2 | 2 | 2 | 0 |" in text and "first byte of the response body" in text


def test_ctrl_c_stops_everything_it_started(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--configs", "batched", "--concurrencies", "1",
                             "--jobs", "50", "--out-dir", str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=worker_base_env({"PYTHONUNBUFFERED": "1"}))
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the first load point runs
            line = proc.stderr.readline()
            lines.append(line)
            if "closed@c1: 50 jobs" in line or proc.poll() is not None:
                break
        started = re.search(r"worker pid (\d+) starting \(log (\S+)\)", "".join(lines))
        pid, workdir = int(started.group(1)), Path(started.group(2)).parent
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.pid == pid for c in children)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
    assert not workdir.exists()  # the worker's logs and caches went too
    # No load point had finished, so there is no partial report to write.
    assert not (tmp_path / "load-tiny-cpu.json").exists()


def test_device_cuda_without_cuda_fails_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _bench("--device", "cuda", "--size", "full", "--out-dir", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert "--device cuda: CUDA is not available on this machine" in done.stderr
    assert not list(tmp_path.iterdir())
