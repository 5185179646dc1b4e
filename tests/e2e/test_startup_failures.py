"""`python -m server` refuses to start, quickly and clearly, when it cannot serve: a model folder without a model,
a bad variable, GCS without a bucket, credentials or an existing bucket, CUDA asked for where there is none.

Each case runs the real command as RunPod would (production mode: the job webhook is set, here to a closed port, so
a worker that wrongly got past start-up would hang in its job loop, and the hang guard would fail the test) and
checks: exit status 2 (server.__main__.EXIT_CONFIG), the cause in its output, no traceback, no job loop started.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.e2e_worker import REPO, worker_env
from testing.gcs_emulator import GcsEmulator

pytestmark = pytest.mark.slow

HANG_GUARD_S = 240  # a hang guard only: each case takes a few seconds (mostly imports)
DEAD_RUNPOD = "http://127.0.0.1:9/v2/fake-endpoint"  # port 9 (discard): nothing listens there


def runpod_production_env() -> dict[str, str]:
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{DEAD_RUNPOD}/job-take/$ID?gpu=fake",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{DEAD_RUNPOD}/job-done/$RUNPOD_POD_ID/$ID?gpu=fake",
        "RUNPOD_POD_ID": "startup-test-worker",
        "RUNPOD_AI_API_KEY": "fake-api-key",
    }


def start_server(env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "server"], env={**env, **runpod_production_env(), "PYTHONPATH": str(REPO)},
            cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HANG_GUARD_S,
            start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        raise AssertionError(f"python -m server still running after {HANG_GUARD_S} s:\n{output[-4000:]}") from None
    return run.returncode, run.stdout + run.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def empty_emulator():
    """fake-gcs-server with no bucket in it."""
    with GcsEmulator() as emulator:
        yield emulator


def local_storage(tmp_path: Path) -> dict[str, str]:
    return {
        "STORAGE_BACKEND": "local", "LOCAL_STORAGE_DIR": str(tmp_path / "storage"), "GCS_BUCKET_NAME": "seu-bucket",
        "AUDIO_CACHE_DIR": str(tmp_path / "audio_cache"), "LATENT_CACHE_DIR": str(tmp_path / "latent_cache"),
        "METRICS_PORT": "0",
    }  # fmt: skip


CASES = {
    # case: (settings, what the output must say)
    "model folder empty": (
        lambda tmp, ckpt, emu: {**local_storage(tmp), "XTTS_MODEL_DIR": str(tmp), "XTTS_DEVICE": "cpu"},
        ["XTTS V2 model is not loaded", "config.json", "model.pth", "vocab.json"],
    ),
    "MAX_BATCH_SIZE=0": (
        lambda tmp, ckpt, emu: {**local_storage(tmp), "XTTS_MODEL_DIR": str(ckpt), "MAX_BATCH_SIZE": "0"},
        ["MAX_BATCH_SIZE must be an integer >= 1, got '0'"],
    ),
    "MAX_CONCURRENCY not a number": (
        lambda tmp, ckpt, emu: {**local_storage(tmp), "XTTS_MODEL_DIR": str(ckpt), "MAX_CONCURRENCY": "lots"},
        ["MAX_CONCURRENCY", "'lots'"],
    ),
    "BATCH_WAIT_MS negative": (
        lambda tmp, ckpt, emu: {**local_storage(tmp), "XTTS_MODEL_DIR": str(ckpt), "BATCH_WAIT_MS": "-5"},
        ["BATCH_WAIT_MS", "'-5'"],
    ),
    "XTTS_DEVICE unknown": (
        lambda tmp, ckpt, emu: {**local_storage(tmp), "XTTS_MODEL_DIR": str(ckpt), "XTTS_DEVICE": "tpu"},
        ["XTTS_DEVICE", "'tpu'"],
    ),
    "gcs without a bucket": (
        lambda tmp, ckpt, emu: {"XTTS_MODEL_DIR": str(ckpt), "STORAGE_BACKEND": "gcs", "METRICS_PORT": "0"},
        ["GCS not configured correctly", "GCS_BUCKET_NAME"],
    ),
    "gcs without credentials": (
        lambda tmp, ckpt, emu: {"XTTS_MODEL_DIR": str(ckpt), "STORAGE_BACKEND": "gcs", "GCS_BUCKET_NAME": "seu-bucket",
                                "METRICS_PORT": "0"},
        ["GCS not configured correctly", "GCS_CREDENTIALS"],
    ),
    "gcs bucket does not exist": (
        lambda tmp, ckpt, emu: {"XTTS_MODEL_DIR": str(ckpt), "STORAGE_BACKEND": "gcs", "GCS_BUCKET_NAME": "seu-bucket",
                                "STORAGE_EMULATOR_HOST": emu.url, "METRICS_PORT": "0",
                                "AUDIO_CACHE_DIR": str(tmp / "audio_cache")},
        ["GCS not configured correctly", "seu-bucket", "does not exist"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_worker_refuses_to_start_with_a_clear_message(case, tmp_path, tiny_checkpoint, empty_emulator):
    settings, expected = CASES[case]
    env = worker_env(**settings(tmp_path, tiny_checkpoint, empty_emulator))
    status, output, seconds = start_server(env, cwd=tmp_path)

    assert status == 2, f"{case}: exit status {status}; output:\n{output[-4000:]}"
    missing = [text for text in expected if text not in output]
    assert not missing, f"{case}: output lacks {missing}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    assert "Starting Serverless Worker" not in output and "engine ready" not in output
    said = next(line for line in output.splitlines() if expected[0] in line)
    print(f"\n{case}: exit {status} after {seconds:.1f} s: {said}")


def test_asking_for_cuda_without_a_gpu_is_refused_at_start(tmp_path, tiny_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the case needs one without")
    env = worker_env(**local_storage(tmp_path), XTTS_MODEL_DIR=str(tiny_checkpoint), XTTS_DEVICE="cuda")
    status, output, seconds = start_server(env, cwd=tmp_path)
    assert status == 2, output[-4000:]
    assert "XTTS V2 model is not loaded" in output and "XTTS_DEVICE=cuda" in output, output[-4000:]
    assert "Traceback" not in output and "Starting Serverless Worker" not in output
    print(f"\ncuda without a GPU: exit {status} after {seconds:.1f} s")
