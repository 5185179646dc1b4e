"""Every error code a caller can provoke comes back readable from the job's `error` string alone, through both
transports RunPod gives a worker:

- the REAL loop: `python -m server` in RunPod's production mode (JobScaler) against testing/runpod_fake.py, storage on
  fake-gcs-server. RunPod's own API answers a FAILED job with its `error` string only, so that is all the test
  reads for the code; the SDK's job-done body keeps `output` (`error_code`, `retryable`), which must agree;
- the local test API (`--rp_serve_api`, local storage), which drops `output` on FAILED entirely.

One worker of each kind (started together, once for the module) answers every case of the table at once. Faults
GCS itself cannot produce (403, 400, an oversized body, a stall) come from a loopback HTTP server the workers may
fetch references from (`ALLOW_LOOPBACK_REF_URLS=1`, host `127.0.0.1` allowed); `storage_unavailable` from a closed
loopback port (one retry, 0.1 s of backoff); `job_timeout` from a reference download that stalls past
`JOB_TIMEOUT_S`. Codes not provoked here, and why, are listed in `NOT_PROVOKED`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from server.errors import parse_error
from testing.accounts import ServiceAccount
from testing.e2e_worker import (
    BUCKET,
    NOT_AUDIO_OBJECT,
    RUN_TIMEOUT_S,
    START_TIMEOUT_S,
    VOICES,
    E2EWorker,
    running_worker,
    server_process,
    worker_env,
)
from testing.gcs_emulator import GcsEmulator
from testing.loopback import LoopbackApp, free_port
from testing.runpod_fake import FAILED, FakeRunPod

pytestmark = pytest.mark.slow

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
JOB_TIMEOUT_S = 6  # the stalled download's job fails at this point; every other case answers in well under it
MAX_REF_BYTES = 1_000_000  # the synthetic voices are ~180 kB; the oversized reference is 1.5 MB

# Codes of the README's list that no input of a caller can provoke here, and why.
NOT_PROVOKED = {
    "empty_text": "validation strips gen_text first and answers a blank one with invalid_input",
    "unsupported_output_format": "validation answers an unknown output_format with invalid_input before the encoder",
    "generation_failed": "needs a fault inside the engine (testing/faulty_worker.py injects it)",
    "out_of_memory": "needs a fault inside the engine (tests/reliability)",
    "fatal_engine_error": "needs a CUDA error (tests/reliability); the worker then exits",
    "worker_shutting_down": "needs a SIGTERM while jobs wait in the queue",
    "internal_error": "a bug: no input provokes one on purpose",
}


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    change: Callable[[RefServer], dict]  # fields to set (None: remove the field) on a valid input
    retryable: bool = False


class RefServer:
    """Loopback HTTP server for reference URLs: `http://127.0.0.1:PORT/seu-bucket/<name>` answers by name."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.signed_requests: list[tuple[str | None, str | None]] = []  # (signature, Range) of signed.wav GETs
        self.port = 0
        self.closed_port = free_port()  # nothing listens there
        self._server: LoopbackApp | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{BUCKET}/{name}"

    @property
    def closed_url(self) -> str:
        return f"http://127.0.0.1:{self.closed_port}/{BUCKET}/down.wav"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "forbidden.wav":
            return web.Response(status=403, text="denied")
        if name == "rejected.wav":
            return web.Response(status=400, text="bad request")
        if name == "huge.wav":
            return web.Response(body=b"\0" * (MAX_REF_BYTES + 500_000), content_type="audio/wav")
        if name == "signed.wav":  # stands in for GCS's V4 signature check: only the valid signature reads
            self.signed_requests.append((request.query.get("X-Goog-Signature"), request.headers.get("Range")))
            if request.query.get("X-Goog-Signature") != "valid":
                return web.Response(status=403, text="SignatureDoesNotMatch")
            return web.Response(body=VOICES[0].wav_bytes(), content_type="audio/wav")
        if name == "stall.wav":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 120)
            return web.Response(status=503)
        return web.Response(status=404, text="no such object")

    async def __aenter__(self) -> RefServer:
        app = web.Application()
        app.router.add_get("/{bucket}/{name}", self._serve)
        self._server = await LoopbackApp(app, shutdown_timeout=1.0).start()
        self.port = self._server.port
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        await self._server.stop()


CASES: tuple[Case, ...] = (
    Case("gen_text missing", "missing_field", lambda r: {"gen_text": None}),
    Case("temperature a string", "invalid_type", lambda r: {"temperature": "hot"}),
    Case("speed 3.0", "out_of_range", lambda r: {"speed": 3.0}),
    Case("a misspelt field", "unknown_field", lambda r: {"temprature": 0.5}),
    Case("gen_text blank", "invalid_input", lambda r: {"gen_text": "   "}),
    Case("output_format aac (unsupported format)", "invalid_input", lambda r: {"output_format": "aac"}),
    Case("gen_text of 5001 characters", "text_too_long", lambda r: {"gen_text": "a" * 5001}),
    Case("voice_id with a path", "invalid_voice_id", lambda r: {"voice_id": "../etc/passwd"}),
    Case("language xx", "unsupported_language", lambda r: {"language": "xx"}),
    Case("bucket not allowed", "invalid_ref_audio_url", lambda r: {"ref_audio_url": "gs://outro-bucket/voz.wav"}),
    Case("host not allowed", "invalid_ref_audio_url",
         lambda r: {"ref_audio_url": f"https://example.com/{BUCKET}/voz.wav"}),
    Case("ftp scheme", "invalid_ref_audio_url", lambda r: {"ref_audio_url": f"ftp://127.0.0.1/{BUCKET}/voz.wav"}),
    Case("gs:// object absent", "ref_audio_not_found",
         lambda r: {"ref_audio_url": f"gs://{BUCKET}/referencias/nao_existe.wav"}),
    Case("URL answering 404", "ref_audio_not_found", lambda r: {"ref_audio_url": r.url("missing.wav")}),
    Case("URL answering 403", "ref_audio_forbidden", lambda r: {"ref_audio_url": r.url("forbidden.wav")}),
    Case("reference over MAX_REF_BYTES", "ref_audio_too_large", lambda r: {"ref_audio_url": r.url("huge.wav")}),
    Case("URL answering 400", "storage_request_rejected", lambda r: {"ref_audio_url": r.url("rejected.wav")}),
    Case("a text file as reference", "invalid_audio", lambda r: {"ref_audio_url": f"gs://{BUCKET}/{NOT_AUDIO_OBJECT}"}),
    Case("nothing speakable", "untokenizable_text", lambda r: {"gen_text": "🙂🙂🙂", "language": "en"}),
    Case("storage down (closed port)", "storage_unavailable", lambda r: {"ref_audio_url": r.closed_url},
         retryable=True),
    Case("download stalls past JOB_TIMEOUT_S", "job_timeout", lambda r: {"ref_audio_url": r.url("stall.wav")},
         retryable=True),
)  # fmt: skip


def job_input(case: Case, refs: RefServer, index: int) -> dict:
    voice = VOICES[0]
    base = {"gen_text": "Olá.", "ref_audio_url": voice.url, "voice_id": f"err_{index:02d}", "language": "pt"}
    for key, value in case.change(refs).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def readme_codes() -> list[str]:
    section = README[README.index("Error codes:") :]
    section = section[: section.index("\n\n")]
    return re.findall(r"`([a-z_]+)`", section)


def test_the_table_covers_every_code_of_the_readme():
    provoked = {case.code for case in CASES}
    documented = set(readme_codes())
    assert documented, "README's error code list not found"
    assert documented == provoked | set(NOT_PROVOKED), (documented - provoked - set(NOT_PROVOKED),
                                                        (provoked | set(NOT_PROVOKED)) - documented)  # fmt: skip
    assert not provoked & set(NOT_PROVOKED)


# ------------------------------------------------------------------------------------------------ workers


@dataclass
class Workers:
    refs: RefServer
    loop_worker: E2EWorker
    fake: FakeRunPod
    local_api: str


ERROR_SETTINGS = {
    "ALLOW_LOOPBACK_REF_URLS": "1",
    "ALLOWED_REF_HOSTS": "storage.googleapis.com,*.storage.googleapis.com,127.0.0.1",
    "ALLOWED_BUCKETS": BUCKET,
    "JOB_TIMEOUT_S": str(JOB_TIMEOUT_S),
    "STORAGE_MAX_RETRIES": "1",
    "STORAGE_RETRY_BASE_S": "0.05",
    "STORAGE_RETRY_MAX_BACKOFF_S": "0.1",
    "STORAGE_TIMEOUT_S": "30",  # the stalled download must outlast JOB_TIMEOUT_S
    "MAX_REF_BYTES": str(MAX_REF_BYTES),
    "MAX_CONCURRENCY": "32",
    "XTTS_DEVICE": "cpu",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workers(
    fake_runpod: FakeRunPod, gcs_bucket: GcsEmulator, service_account: ServiceAccount, tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Workers]:  # fmt: skip
    """Both workers, started together: the real loop on GCS, the local test API on local storage."""
    folder = tmp_path_factory.mktemp("e2e-error-codes")
    storage_dir = folder / "local_storage"
    voice = VOICES[0]
    for name, data in ((voice.object_name, voice.wav_bytes()), (NOT_AUDIO_OBJECT, gcs_bucket.get_object(
            BUCKET, NOT_AUDIO_OBJECT))):  # fmt: skip
        path = storage_dir / BUCKET / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    local_env = worker_env(
        XTTS_MODEL_DIR=str(tiny_checkpoint), STORAGE_BACKEND="local", LOCAL_STORAGE_DIR=str(storage_dir),
        GCS_BUCKET_NAME=BUCKET, AUDIO_CACHE_DIR=str(folder / "local_audio_cache"),
        LATENT_CACHE_DIR=str(folder / "local_latent_cache"), METRICS_PORT=str(free_port()), **ERROR_SETTINGS,
    )  # fmt: skip
    loop_env = worker_env(
        XTTS_MODEL_DIR=str(tiny_checkpoint), METRICS_PORT=str(metrics_port := free_port()),
        LATENT_CACHE_DIR=str(folder / "latent_cache"), AUDIO_CACHE_DIR=str(folder / "audio_cache"),
        STORAGE_BACKEND="gcs", STORAGE_EMULATOR_HOST=gcs_bucket.url, GCS_BUCKET_NAME=BUCKET,
        GCS_CREDENTIALS=service_account.json, **ERROR_SETTINGS,
    )  # fmt: skip
    api_port = free_port()
    args = ["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(api_port)]
    api_log = folder / "error-codes-local-api.log"
    base = f"http://127.0.0.1:{api_port}"
    async with RefServer() as refs:
        with server_process("error-codes-local-api", args, local_env, api_log) as api:
            async with running_worker("error-codes-loop", fake_runpod, loop_env, folder,
                                      metrics_port=metrics_port) as loop_worker:  # fmt: skip
                await asyncio.to_thread(api.wait_ready, f"{base}/openapi.json", START_TIMEOUT_S)
                yield Workers(refs, loop_worker, fake_runpod, base)


def check(case: Case, error: object) -> str:
    """The code and the retry hint, read from the `error` string alone."""
    assert isinstance(error, str), (case.name, error)
    code, retryable, text = parse_error(error)
    assert (code, retryable) == (case.code, case.retryable), (case.name, error)
    assert text and not text.startswith("["), (case.name, error)
    return error


def print_table(transport: str, rows: list[tuple[Case, str]]) -> None:
    print(f"\n{transport}: {len(rows)} cases")
    for case, error in rows:
        print(f"  {case.code:<26} {case.name:<40} {error[:110]}")


@pytest.mark.asyncio(loop_scope="module")
async def test_every_code_reads_from_the_error_string_through_the_real_runpod_loop(workers: Workers):
    fake, refs = workers.fake, workers.refs
    before = await workers.loop_worker.metrics()
    ids = [fake.enqueue(job_input(case, refs, i)) for i, case in enumerate(CASES)]
    jobs = await fake.wait_done(ids, timeout_s=RUN_TIMEOUT_S)

    rows = []
    for case, job_id in zip(CASES, ids, strict=True):
        job = jobs[job_id]
        assert job.state == FAILED, (case.name, job.state, job.result)
        rows.append((case, check(case, job.result["error"])))
        # The SDK's body also keeps the output (RunPod's API then drops it): both must say the same.
        output = job.result.get("output") or {}
        assert output.get("error_code") == case.code and output.get("retryable", False) is case.retryable, output
    print_table("real RunPod loop (the error string of the job-done body)", rows)

    delta = (await workers.loop_worker.metrics()).minus(before)
    assert delta.jobs("invalid") + delta.jobs("failed") == len(CASES)
    assert delta.jobs("completed") == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_every_code_reads_from_the_error_string_through_the_local_test_api(workers: Workers):
    refs = workers.refs

    def runsync(payload: dict) -> dict:
        request = urllib.request.Request(f"{workers.local_api}/runsync", data=json.dumps(payload).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=RUN_TIMEOUT_S) as response:
            assert response.status == 200
            return json.loads(response.read())

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        answers = await asyncio.gather(*(
            loop.run_in_executor(pool, runsync, {"input": job_input(case, refs, 100 + i)})
            for i, case in enumerate(CASES)
        ))  # fmt: skip

    rows = []
    for case, answer in zip(CASES, answers, strict=True):
        assert answer["status"] == "FAILED", (case.name, answer)
        assert "output" not in answer, answer  # the local API keeps nothing but the string
        rows.append((case, check(case, answer["error"])))
    print_table("local test API (/runsync)", rows)


@pytest.mark.asyncio(loop_scope="module")
async def test_silent_and_quiet_references_fail_invalid_audio_with_their_level_while_good_jobs_flow(
    workers: Workers, gcs_bucket: GcsEmulator, tmp_path_factory: pytest.TempPathFactory,
):  # fmt: skip
    """Issue #16: an all-zero reference and one peaking below REF_MIN_LEVEL_DBFS (-50 dBFS by default) fail
    `invalid_audio` with the measured level in the message, through the real loop; no speaker latents are kept
    for them; good jobs sent between them complete."""
    import io

    import numpy as np
    import soundfile as sf

    def wav(samples: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        sf.write(buffer, samples.astype(np.float32), 22050, format="WAV", subtype="FLOAT")
        return buffer.getvalue()

    t = np.arange(3 * 22050) / 22050
    gcs_bucket.put_object(BUCKET, "referencias/mudo.wav", wav(np.zeros_like(t)), "audio/wav")
    quiet = 10 ** (-60 / 20) * np.sin(2 * np.pi * 150 * t)  # peak -60 dBFS: 10 dB under the floor
    gcs_bucket.put_object(BUCKET, "referencias/baixo.wav", wav(quiet), "audio/wav")
    fake, worker = workers.fake, workers.loop_worker
    before = await worker.metrics()

    def job(ref: str, voice_id: str, seed: int) -> dict:
        return {"gen_text": "Olá.", "ref_audio_url": f"gs://{BUCKET}/{ref}", "voice_id": voice_id,
                "language": "pt", "seed": seed}  # fmt: skip

    good = VOICES[0]
    ids = [fake.enqueue(job(good.object_name, "bom_1", 1)), fake.enqueue(job("referencias/mudo.wav", "mudo", 2)),
           fake.enqueue(job(good.object_name, "bom_2", 3)), fake.enqueue(job("referencias/baixo.wav", "baixo", 4)),
           fake.enqueue(job(good.object_name, "bom_3", 5))]  # fmt: skip
    jobs = await fake.wait_done(ids, timeout_s=RUN_TIMEOUT_S)
    good_ids, silent_id, quiet_id = (ids[0], ids[2], ids[4]), ids[1], ids[3]
    assert all(jobs[i].state == "COMPLETED" for i in good_ids), [jobs[i].result for i in good_ids]
    for job_id, level in ((silent_id, "peak -inf dBFS"), (quiet_id, "peak -60.0 dBFS")):
        result = jobs[job_id].result
        assert jobs[job_id].state == FAILED, result
        code, retryable, text = parse_error(result["error"])
        assert (code, retryable) == ("invalid_audio", False), result
        assert level in text and "at least -50 dBFS is needed" in text, text
    delta = (await worker.metrics()).minus(before)
    # Conditioning ran exactly for the good jobs that report a latent-cache miss (the good voice once at most)
    # and never for the refused references: no latents are computed or kept for them.
    computed = sum(not jobs[i].output["latent_cache_hit"] for i in good_ids)
    assert computed <= 1
    assert delta.total("xtts_stage_duration_seconds_count", stage="conditioning") == computed
    assert delta.total("xtts_cache_misses_total", cache="latents") == computed


@pytest.mark.asyncio(loop_scope="module")
async def test_a_forged_signature_is_refused_after_a_valid_one_cached_the_reference(workers: Workers):
    """Issue #17: the reference cache keys on the object, not the URL; a hit for an https reference must prove
    that this caller's URL grants access. A forged signature for the object a valid one downloaded is refused
    (`ref_audio_forbidden`), not served from the cache; a re-signed valid URL is a hit after one ranged GET."""
    fake, refs = workers.fake, workers.refs
    url = refs.url("signed.wav")

    def job(signature: str, seed: int) -> dict:
        return {"gen_text": "Olá.", "ref_audio_url": f"{url}?X-Goog-Expires=600&X-Goog-Signature={signature}",
                "voice_id": "assinada", "language": "pt", "seed": seed}  # fmt: skip

    first = await fake.wait_done([fake.enqueue(job("valid", 1))], timeout_s=RUN_TIMEOUT_S)
    (valid,) = first.values()
    assert valid.state == "COMPLETED" and valid.output["reference_cache_hit"] is False, valid.result
    forged_id = fake.enqueue(job("forged", 2))
    forged = (await fake.wait_done([forged_id], timeout_s=RUN_TIMEOUT_S))[forged_id]
    assert forged.state == FAILED, forged.result
    code, retryable, text = parse_error(forged.result["error"])
    assert (code, retryable) == ("ref_audio_forbidden", False) and "forged" not in text, forged.result
    again_id = fake.enqueue(job("valid", 3))
    again = (await fake.wait_done([again_id], timeout_s=RUN_TIMEOUT_S))[again_id]
    assert again.state == "COMPLETED" and again.output["reference_cache_hit"] is True, again.result
    # One full download, then one 1-byte ranged GET per cache hit, each with that caller's own signature.
    assert refs.signed_requests == [("valid", None), ("forged", "bytes=0-0"), ("valid", "bytes=0-0")]
