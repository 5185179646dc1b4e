"""STREAMING=on through the real worker (`python -m server` in RunPod's production loop against
testing/runpod_fake.py, local storage): audio items reach the job's stream channel in order and before the
result; the job's aggregate output (what /runsync answers) holds every item, then the result; the items joined
are the stored file's audio; a job RunPod stops mid-stream frees its rows; a failing job ends FAILED with its
error code in RunPod's message."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from testing.e2e_worker import MetricsSnapshot
from testing.loopback import free_port
from testing.runpod_fake import CANCELLED, COMPLETED, FAILED, FakeRunPod
from testing.runpod_worker import RUN_TIMEOUT_S, put_reference, start_worker, worker_env

pytestmark = pytest.mark.slow

TEXT = ("Esta é uma resposta falada em pedaços, para que o primeiro som chegue cedo. A segunda frase continua "
        "a ideia com mais palavras. E a terceira fecha o parágrafo sem pressa nenhuma, devagar.")  # fmt: skip
LONG = " ".join([TEXT] * 3)


def job(ref: str, text: str, seed: int = 1, **extra) -> dict:
    return {"gen_text": text, "ref_audio_url": ref, "voice_id": "voz", "language": "pt", "seed": seed, **extra}


def metrics(port: int) -> MetricsSnapshot:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return MetricsSnapshot.parse(response.read().decode())


def stored(tmp: Path, object_name: str) -> np.ndarray:
    audio, _ = sf.read(io.BytesIO((tmp / "objects" / "voices" / object_name).read_bytes()), dtype="float32")
    return audio


async def test_streamed_jobs_through_the_real_loop(tmp_path):
    port = free_port()
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "voz.wav")
        env = worker_env(fake, tmp_path, STREAMING="on", MAX_CONCURRENCY="8", MAX_BATCH_SIZE="8",
                         METRICS_PORT=str(port))  # fmt: skip
        worker = await start_worker(fake, env, tmp_path / "worker.log")
        try:
            # 1. A streamed job.
            streamed = fake.enqueue(job(ref, TEXT))
            assert await fake.wait_done([streamed], RUN_TIMEOUT_S), worker.log_text()[-3000:]
            # 2. A job RunPod stops once its first audio arrived.
            stopped = fake.enqueue(job(ref, LONG, seed=2))
            assert await fake.wait_until(lambda: len(fake.jobs[stopped].stream) > 0, RUN_TIMEOUT_S), \
                worker.log_text()[-3000:]  # fmt: skip
            assert fake.cancel(stopped) == "stopping"
            freed = False
            for _ in range(120):
                if await asyncio.to_thread(_idle, port):
                    freed = True
                    break
                await asyncio.sleep(0.5)
            # 3. A failing job, and one that asks for no stream.
            failing = fake.enqueue(job(ref.replace("voz.wav", "nao_existe.wav"), TEXT))
            plain = fake.enqueue(job(ref, "Olá!", stream=False))
            assert await fake.wait_done([failing, plain], RUN_TIMEOUT_S), worker.log_text()[-3000:]
        finally:
            await worker.stop(10)

    s = fake.jobs[streamed]
    assert s.state == COMPLETED, s.result
    items = [post["output"] for post in s.stream]
    audio, result = items[:-1], items[-1]
    assert [i["type"] for i in audio] == ["audio"] * len(audio) and result["type"] == "result"
    assert [i["index"] for i in audio] == list(range(len(audio))) and len(audio) >= 3
    assert s.stream_at == sorted(s.stream_at) and s.stream_at[-1] <= s.done_at
    assert s.result["output"] == items  # the aggregate: every item, then the result
    # Its size against the audio (the README's and the handler's AGGREGATE_BYTES_PER_S): base64 PCM and the keys.
    aggregate_bytes = len(json.dumps(s.result))
    audio_s = sum(i["duration"] for i in audio)
    print(f"\njob-done body: {aggregate_bytes} bytes for {audio_s:.2f} s of audio "
          f"({aggregate_bytes / audio_s:.0f} B/s)")  # fmt: skip
    assert 64_000 * audio_s < aggregate_bytes < 64_000 * audio_s + 400 * len(items) + 2000
    joined = np.concatenate([np.frombuffer(base64.b64decode(i["audio"]), "<i2") for i in audio]) / 32767.0
    np.testing.assert_allclose(joined, stored(tmp_path, result["object_name"]), rtol=0, atol=1e-3)
    # The first audio came well before the whole job was done.
    first_s, total_s = s.stream_at[0] - s.taken_at, s.done_at - s.taken_at
    assert 0 < result["time_to_first_audio"] < result["total_time"]
    print(f"\nfirst audio after {first_s:.2f} s of {total_s:.2f} s ({len(audio)} items)")
    assert first_s < 0.6 * total_s

    assert fake.jobs[stopped].state == CANCELLED and freed, ("the stopped job's rows were not freed", _last)
    assert not fake.jobs[stopped].late_results  # no result posted after the stop
    assert fake.jobs[failing].state == FAILED
    assert fake.jobs[failing].result["error"].startswith("[ref_audio_not_found]")
    p = fake.jobs[plain]
    assert p.state == COMPLETED and [i["type"] for i in p.output] == ["result"] and len(p.stream) == 1


_last: dict = {}


def _idle(port: int) -> bool:
    m = metrics(port)
    _last.update(rows=m.get("xtts_running_rows"), queue=m.get("xtts_queue_depth_requests"),
                 in_flight=m.get("xtts_jobs_in_flight"))  # fmt: skip
    return m.get("xtts_running_rows") == 0 and m.get("xtts_queue_depth_requests") == 0 and \
        m.get("xtts_jobs_in_flight") == 0  # fmt: skip


async def test_stream_aggregate_off_keeps_the_job_done_post_small(tmp_path):
    """STREAM_AGGREGATE=off: every item, the result item included, reaches /stream, and the job-done POST carries
    an empty output list instead of the whole stream again."""
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "voz.wav")
        env = worker_env(fake, tmp_path, STREAMING="on", STREAM_AGGREGATE="off", METRICS_PORT=str(free_port()))
        worker = await start_worker(fake, env, tmp_path / "worker.log")
        try:
            streamed = fake.enqueue(job(ref, TEXT))
            assert await fake.wait_done([streamed], RUN_TIMEOUT_S), worker.log_text()[-3000:]
        finally:
            await worker.stop(10)
    s = fake.jobs[streamed]
    assert s.state == COMPLETED and s.result["output"] == [] and len(json.dumps(s.result)) < 100, s.result
    items = [post["output"] for post in s.stream]
    assert [i["type"] for i in items[:-1]] == ["audio"] * (len(items) - 1) and items[-1]["type"] == "result"
    joined = np.concatenate([np.frombuffer(base64.b64decode(i["audio"]), "<i2") for i in items[:-1]]) / 32767.0
    np.testing.assert_allclose(joined, stored(tmp_path, items[-1]["object_name"]), rtol=0, atol=1e-3)
