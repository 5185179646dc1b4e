"""End to end through RunPod's REAL job loop: `python -m server` in production mode (RUNPOD_WEBHOOK_GET_JOB ->
testing.runpod_fake.FakeRunPod on 127.0.0.1), GCS on fake-gcs-server with a throwaway service-account key (result URLs
are V4-signed), the tiny random-weight demo checkpoint on CPU. One worker serves every test of this module.

- a mixed load (the seed README's three example payloads verbatim, plus more voices, languages and formats) all
  completes, every result downloads over plain HTTP and decodes with its stated duration, and the metrics endpoint,
  scraped while the jobs run, shows batches of more than one row and latent-cache hits; over the run, the mean
  batch and the latent-cache hit rate the README states;
- a corpus of bad inputs each gets its own clear error, while good jobs interleaved with them all succeed;
- a job cancelled on RunPod's stop channel while it waits in the worker's queue never runs, never posts a result,
  and the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import io
import itertools
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import soundfile as sf

from testing.e2e_worker import (
    BUCKET,
    MISSING_OBJECT,
    NOT_AUDIO_OBJECT,
    RUN_TIMEOUT_S,
    SEED_INPUT,
    SEED_KEYS,
    SEED_PARAMETER_KEYS,
    VOICES,
    E2EWorker,
    MetricsSnapshot,
)  # fmt: skip
from testing.runpod_fake import CANCELLED, COMPLETED, FAILED, FakeJob, FakeRunPod

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

JOAO, MARIA, CARLOS, ANA = VOICES
# The mean rows per decoding step of the mixed load (36 one-segment jobs, MAX_BATCH_SIZE 8, continuous batching):
# measured 7.3 (the README's figure); asserted with a margin, as if one step in five ran a batch of one.
MIN_MEAN_ROWS_PER_STEP = 6.0
DEFAULT_PARAMETERS = {"temperature": 0.7, "speed": 1.0, "top_k": 50, "top_p": 0.85}
SF_FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG"}

# The seed README's three example payloads, verbatim (test_input.json; the curl example; the Python example).
SEED_CURL_INPUT = {
    "gen_text": "Olá, mundo!", "ref_audio_url": "gs://meu-bucket/vozes/maria.wav", "voice_id": "maria_news",
    "language": "pt", "temperature": 0.75, "speed": 1.1,
}  # fmt: skip
SEED_PYTHON_INPUT = {
    "gen_text": "Este é um teste de síntese de voz.", "ref_audio_url": "gs://meu-bucket/vozes/carlos.wav",
    "voice_id": "carlos_podcast", "language": "pt", "temperature": 0.8, "speed": 0.95,
}  # fmt: skip

# Short sentences (3-8 words): the demo model speaks ~65 ms per character and the CPU vocoder is the slow part.
SENTENCES = {
    "pt": ["Bom dia, tudo bem com você?", "O café está pronto agora."],
    "en": ["The quick brown fox jumps.", "Hello there, how are you today?"],
    "es": ["Hola, ¿cómo estás hoy?", "La casa es muy grande."],
    "fr": ["Bonjour, comment allez-vous?", "Le chat dort sur le lit."],
    "de": ["Guten Morgen, wie geht es?", "Das Wetter ist heute schön."],
    "it": ["Buongiorno, come stai oggi?"],
    "pl": ["Dzień dobry, jak się masz?"],
    "ru": ["Привет, как у тебя дела?"],
    "ja": ["こんにちは、元気ですか。"],
    "zh-cn": ["你好，今天天气很好。"],
}


def mixed_load() -> list[dict]:
    """36 jobs: the seed's examples (each three times), then 27 more over four voices, ten languages, four formats
    and varied sampling parameters. Deterministic, so a failure names the same job every run."""
    jobs = [copy.deepcopy(SEED_INPUT), dict(SEED_CURL_INPUT), dict(SEED_PYTHON_INPUT)] * 3
    texts = itertools.cycle([(lang, text) for lang, texts in SENTENCES.items() for text in texts])
    formats = itertools.cycle(["wav", "flac", "mp3", "wav", "ogg", None])
    voices = itertools.cycle(VOICES)
    for n in range(27):
        language, text = next(texts)
        voice = next(voices)
        job = {"gen_text": text, "ref_audio_url": voice.url, "voice_id": voice.voice_id, "language": language}
        fmt = next(formats)
        if fmt is not None:
            job["output_format"] = fmt
        if n % 3 == 0:
            job.update(temperature=round(0.1 + 0.1 * (n % 10), 2), top_k=1 + 7 * n, top_p=round(0.5 + n / 60, 3))
        if n % 4 == 1:
            job.update(speed=[0.5, 0.8, 1.25, 2.0][n % 4], repetition_penalty=2.0 + n % 5)
        if n % 5 == 2:
            job["seed"] = 1000 + n
        jobs.append(job)
    # Languages in other casings are accepted and answered canonically.
    jobs[-1]["language"] = jobs[-1]["language"].upper()
    return jobs


async def scrape_while(worker: E2EWorker, done: asyncio.Event, snapshots: list[MetricsSnapshot]) -> None:
    """Scrape the metrics endpoint every 0.5 s until `done`; keep the scrapes taken while jobs were in flight."""
    while not done.is_set():
        snapshot = await worker.metrics()
        if snapshot.in_flight > 0:
            snapshots.append(snapshot)
        try:
            await asyncio.wait_for(done.wait(), 0.5)
        except TimeoutError:
            pass


async def run_jobs(fake: FakeRunPod, worker: E2EWorker, inputs: list, *, scrape: list | None = None):
    """Enqueue `inputs`, wait for all of them (scraping metrics meanwhile into `scrape`); returns the jobs in order."""
    job_ids = fake.enqueue_many(inputs)
    done = asyncio.Event()
    scraper = asyncio.create_task(scrape_while(worker, done, scrape if scrape is not None else []))
    try:
        jobs = await fake.wait_done(job_ids, RUN_TIMEOUT_S)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; worker alive: {worker.alive}") from None
    finally:
        done.set()
        await scraper
    return [jobs[i] for i in job_ids]


async def download(url: str) -> bytes:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(url) as response:
            assert response.status == 200, f"GET {url.split('?')[0]} answered {response.status}"
            return await response.read()


def expected_parameters(job_input: dict) -> dict:
    return {key: job_input.get(key, DEFAULT_PARAMETERS[key]) for key in SEED_PARAMETER_KEYS}


async def check_completed(job: FakeJob, emulator_url: str) -> dict:
    """Everything the seed promises about one completed job; returns its output."""
    assert job.state == COMPLETED, f"{job.id}: {job.state} {job.result}"
    assert job.result_posts == 1
    out = job.output
    job_input = job.input
    for key in SEED_KEYS:
        assert key in out, f"{job.id}: output lacks {key!r}: {sorted(out)}"
    assert out["voice_id"] == job_input["voice_id"]
    assert out["language"] == job_input.get("language", "pt").lower()
    assert isinstance(out["generation_time"], float | int) and out["generation_time"] >= 0
    assert sorted(out["parameters"]) == sorted(SEED_PARAMETER_KEYS)
    assert out["parameters"] == pytest.approx(expected_parameters(job_input))
    fmt = job_input.get("output_format", "wav")
    assert out["output_format"] == fmt

    # A V4-signed URL on the emulator (the emulator ignores the signature, so plain HTTP downloads it).
    url = out["audio_url"]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == emulator_url
    assert parts.path.startswith(f"/{BUCKET}/generated/{job_input['voice_id']}_") and parts.path.endswith(f".{fmt}")
    query = parse_qs(parts.query)
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"] and query["X-Goog-Signature"][0], url.split("?")[0]
    assert out["object_name"] == parts.path.removeprefix(f"/{BUCKET}/")

    data = await download(url)
    info = sf.info(io.BytesIO(data))
    assert info.format == SF_FORMATS[fmt], f"{job.id}: {fmt} requested, file is {info.format}"
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert audio.ndim == 1 and len(audio) > 0
    assert abs(len(audio) / rate - out["duration"]) <= 0.01, (
        f"{job.id} ({fmt}): file holds {len(audio) / rate:.4f} s, output says duration {out['duration']}"
    )
    return out


async def test_mixed_load_with_the_seed_payloads_completes_batched_and_downloadable(
    fake_runpod: FakeRunPod, gcs_worker: E2EWorker, gcs_bucket
):
    inputs = mixed_load()
    assert len(inputs) >= 32 and len({j["voice_id"] for j in inputs}) >= 4
    before = await gcs_worker.metrics()
    during: list[MetricsSnapshot] = []
    jobs = await run_jobs(fake_runpod, gcs_worker, inputs, scrape=during)

    states = collections.Counter(job.state for job in jobs)
    assert states == {COMPLETED: len(inputs)}, {j.id: j.result for j in jobs if j.state != COMPLETED}
    outputs = [await check_completed(job, gcs_bucket.url) for job in jobs]
    assert len({out["object_name"] for out in outputs}) == len(outputs)  # no two results share an object

    # The SDK really ran jobs concurrently (16 slots), and the worker batched rows of different jobs.
    after = await gcs_worker.metrics()
    delta = after.minus(before)
    assert fake_runpod.max_in_progress == 16
    assert delta.jobs("completed") == len(inputs)
    # Scraped while jobs were in flight: batches of more than one row and latent-cache hits already show.
    assert during, "no scrape caught a job in flight"
    in_flight_views = [snapshot.minus(before) for snapshot in during]
    assert any(view.batches - view.batches_of_one > 0 for view in in_flight_views), [
        view.batch_size_counts() for view in in_flight_views
    ]
    assert any(view.latent_hits > 0 for view in in_flight_views)
    # Over the whole run: at most one conditioning pass per voice (single-flight; none for a voice an earlier test
    # of this module already used), every other job a latent-cache hit.
    assert delta.latent_hits + delta.latent_misses == len(inputs)
    assert delta.latent_misses <= len(VOICES)
    assert delta.rows_admitted == len(inputs)  # every job here is one segment
    # The README's figures: rows decoded together, and a latent-cache hit rate of 89% (one conditioning per voice).
    # Continuous batching observes xtts_batch_size_rows once per decoding step, so its mean is the rows per step
    # over the run, the tails of finishing rows included.
    mean_batch = delta.batch_rows / delta.batches
    assert mean_batch >= MIN_MEAN_ROWS_PER_STEP, (mean_batch, delta.batch_size_counts())
    assert max(out["batch_size"] for out in outputs) > 1
    hit_rate = delta.latent_hits / (delta.latent_hits + delta.latent_misses)
    assert hit_rate >= (len(inputs) - len(VOICES)) / len(inputs) > 0.88, hit_rate  # 32 / 36 = 89%
    summary = {
        "jobs": len(inputs), "completed": states[COMPLETED], "scrapes_in_flight": len(during),
        "batches": delta.batches, "batch_size_histogram": delta.batch_size_counts(),
        "mean_batch_rows": round(mean_batch, 2), "latent_hit_rate": round(hit_rate, 3),
        "max_in_progress": fake_runpod.max_in_progress,
        "formats": dict(collections.Counter(out["output_format"] for out in outputs)),
        "languages": dict(collections.Counter(out["language"] for out in outputs)),
    }  # fmt: skip
    print(f"\nmixed load: {summary}")


def bad(case: str, code: str, mention: str | tuple[str, ...], **changes) -> tuple[str, object, str, tuple[str, ...]]:
    """A bad input: the seed's payload with `changes` (a value of DROP removes the field), the error code it must
    get, and what its message must mention (the field, or the object it names)."""
    job_input = dict(SEED_INPUT)
    for key, value in changes.items():
        if value is DROP:
            job_input.pop(key, None)
        else:
            job_input[key] = value
    return case, job_input, code, (mention,) if isinstance(mention, str) else mention


DROP = object()
GS = f"gs://{BUCKET}"

BAD_INPUTS = [
    # Each required field missing (and explicitly null), and the whole input missing or not an object.
    bad("gen_text missing", "missing_field", "gen_text", gen_text=DROP),
    bad("ref_audio_url missing", "missing_field", "ref_audio_url", ref_audio_url=DROP),
    bad("voice_id missing", "missing_field", "voice_id", voice_id=DROP),
    bad("gen_text null", "missing_field", "gen_text", gen_text=None),
    ("input null", None, "missing_field", ("input",)),
    ("input a string", "Olá, mundo!", "invalid_type", ("input",)),
    ("input a list", [SEED_INPUT], "invalid_type", ("input",)),
    # Each field with a wrong type.
    bad("gen_text a number", "invalid_type", "gen_text", gen_text=123),
    bad("gen_text a list", "invalid_type", "gen_text", gen_text=["Olá"]),
    bad("ref_audio_url a number", "invalid_type", "ref_audio_url", ref_audio_url=5),
    bad("voice_id a number", "invalid_type", "voice_id", voice_id=42),
    bad("language a number", "invalid_type", "language", language=7),
    bad("temperature a string", "invalid_type", "temperature", temperature="0.7"),
    bad("speed a boolean", "invalid_type", "speed", speed=True),
    bad("top_k a string", "invalid_type", "top_k", top_k="50"),
    bad("top_k a fraction", "invalid_type", "top_k", top_k=1.5),
    bad("top_p a list", "invalid_type", "top_p", top_p=[0.85]),
    bad("repetition_penalty an object", "invalid_type", "repetition_penalty", repetition_penalty={"v": 5}),
    bad("seed a fraction", "invalid_type", "seed", seed=1.5),
    bad("seed a string", "invalid_type", "seed", seed="42"),
    bad("output_format a number", "invalid_type", "output_format", output_format=3),
    # Each numeric bound crossed.
    bad("temperature 0.05", "out_of_range", "temperature", temperature=0.05),
    bad("temperature 1.5", "out_of_range", "temperature", temperature=1.5),
    bad("speed 0.4", "out_of_range", "speed", speed=0.4),
    bad("speed 2.1", "out_of_range", "speed", speed=2.1),
    bad("top_k 0", "out_of_range", "top_k", top_k=0),
    bad("top_p 0", "out_of_range", "top_p", top_p=0),
    bad("top_p 1.5", "out_of_range", "top_p", top_p=1.5),
    bad("repetition_penalty 0.5", "out_of_range", "repetition_penalty", repetition_penalty=0.5),
    bad("repetition_penalty 25", "out_of_range", "repetition_penalty", repetition_penalty=25),
    bad("seed -1", "out_of_range", "seed", seed=-1),
    # Unknown fields (a typo must not be silently ignored).
    bad("unknown field temprature", "unknown_field", "temprature", temprature=0.7),
    bad("unknown field webhook", "unknown_field", "webhook", webhook="https://example.com/hook"),
    # Unsupported language.
    bad("language pt-BR", "unsupported_language", "pt-BR", language="pt-BR"),
    bad("language xx", "unsupported_language", "xx", language="xx"),
    # Bad voice ids.
    bad("voice_id ../x", "invalid_voice_id", "voice_id", voice_id="../x"),
    bad("voice_id with a slash", "invalid_voice_id", "voice_id", voice_id="vozes/joao"),
    bad("voice_id empty", "invalid_voice_id", "voice_id", voice_id=""),
    # Empty, blank and too long text; an output format we do not write.
    bad("gen_text empty", "invalid_input", "gen_text", gen_text=""),
    bad("gen_text blank", "invalid_input", "gen_text", gen_text="   \n\t "),
    bad("gen_text too long", "text_too_long", "gen_text", gen_text="Olá mundo. " * 460),
    bad("output_format aac", "invalid_input", "output_format", output_format="aac"),
    # References that are not in GCS, or not allowed: refused before any I/O.
    bad("metadata service URL", "invalid_ref_audio_url", "ref_audio_url",
        ref_audio_url="http://169.254.169.254/latest"),
    bad("metadata service over https", "invalid_ref_audio_url", "ref_audio_url",
        ref_audio_url="https://169.254.169.254/latest/meta-data"),
    bad("file URL", "invalid_ref_audio_url", "ref_audio_url", ref_audio_url="file:///etc/passwd"),
    bad("https host not allowed", "invalid_ref_audio_url", "ref_audio_url",
        ref_audio_url="https://example.com/voz.wav"),
    bad("bucket not allowed", "invalid_ref_audio_url", ("ref_audio_url", "ALLOWED_BUCKETS"),
        ref_audio_url="gs://outro-bucket/voz.wav"),
    bad("gs URL without object", "invalid_ref_audio_url", "ref_audio_url", ref_audio_url=f"{GS}/"),
    # References that pass the checks but cannot be used.
    bad("reference missing", "ref_audio_not_found", f"{GS}/{MISSING_OBJECT}",
        ref_audio_url=f"{GS}/{MISSING_OBJECT}", voice_id="voz_fantasma"),
    # The same voice_id as a cached good voice, with another reference: never answered from that cache entry.
    bad("cached voice_id, missing reference", "ref_audio_not_found", f"{GS}/{MISSING_OBJECT}",
        ref_audio_url=f"{GS}/{MISSING_OBJECT}"),
    bad("reference not audio", "invalid_audio", "reference audio",
        ref_audio_url=f"{GS}/{NOT_AUDIO_OBJECT}", voice_id="voz_texto"),
    bad("reference not audio, again", "invalid_audio", "reference audio",
        ref_audio_url=f"{GS}/{NOT_AUDIO_OBJECT}", voice_id="voz_texto_2"),
]  # fmt: skip

GOOD_TEXTS = ["Um dois três quatro.", "Bom dia a todos.", "Vamos começar agora.", "Tudo certo por aqui."]


async def test_bad_inputs_get_clear_errors_while_good_jobs_between_them_succeed(
    fake_runpod: FakeRunPod, gcs_worker: E2EWorker, gcs_bucket
):
    assert len({case for case, *_ in BAD_INPUTS}) == len(BAD_INPUTS)
    good_inputs = []
    inputs, expected = [], []
    voices = itertools.cycle(VOICES)
    for n, (case, job_input, code, mention) in enumerate(BAD_INPUTS):
        inputs.append(job_input)
        expected.append((case, code, mention))
        if n % 4 == 3:  # a good job after every four bad ones
            voice = next(voices)
            good = {"gen_text": GOOD_TEXTS[len(good_inputs) % len(GOOD_TEXTS)], "ref_audio_url": voice.url,
                    "voice_id": voice.voice_id, "language": "pt", "seed": len(good_inputs)}  # fmt: skip
            good_inputs.append(good)
            inputs.append(good)
            expected.append(None)
    before = await gcs_worker.metrics()
    jobs = await run_jobs(fake_runpod, gcs_worker, inputs)

    wrong = []
    for job, want in zip(jobs, expected, strict=True):
        if want is None:
            continue
        case, code, mention = want
        result = job.result or {}
        got_code = (result.get("output") or {}).get("error_code")
        message = result.get("error")
        if job.state != FAILED or got_code != code or not all(m in str(message) for m in mention):
            wrong.append((case, job.state, result))
            continue
        # The SDK lifts "error" to the top and keeps the rest: {"error": message, "output": {"error_code": code}}.
        assert result == {"error": message, "output": {"error_code": code}}, (case, result)  # not retryable
        assert "Traceback" not in message and "internal error" not in message, (case, message)
        assert job.result_posts == 1
    assert not wrong, "bad inputs not answered as expected:\n" + "\n".join(map(repr, wrong))

    good_jobs = [job for job, want in zip(jobs, expected, strict=True) if want is None]
    assert len(good_jobs) == len(good_inputs) >= 10
    for job in good_jobs:
        await check_completed(job, gcs_bucket.url)

    delta = (await gcs_worker.metrics()).minus(before)
    assert delta.jobs("invalid") == len(BAD_INPUTS)
    assert delta.jobs("completed") == len(good_jobs)
    assert delta.jobs("failed") == 0  # no bad input is mistaken for a worker fault
    codes = collections.Counter(code for _, _, code, _ in BAD_INPUTS)
    print(f"\nbad inputs: {len(BAD_INPUTS)} failed as expected ({dict(codes)}); good jobs between them: "
          f"{len(good_jobs)} completed")  # fmt: skip


async def wait_for_metrics(worker: E2EWorker, predicate, what: str, *, give_up=None, timeout_s=RUN_TIMEOUT_S):
    """Scrape every 0.1 s until `predicate(snapshot)`; returns that snapshot. An AssertionError on timeout, or as
    soon as `give_up(snapshot)` says the awaited state can no longer come."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        snapshot = await worker.metrics()
        if predicate(snapshot):
            return snapshot
        if give_up is not None and give_up(snapshot):
            raise AssertionError(f"{what} can no longer happen: {snapshot.samples}")
        if loop.time() > deadline or not worker.alive:
            raise AssertionError(f"timed out waiting for {what} (worker alive: {worker.alive})")
        await asyncio.sleep(0.1)


# A long text: more than the 203 characters XTTS speaks at once in Portuguese, so it is split into segments.
LONG_TEXT = (
    "Esta é uma mensagem longa que nunca deveria ser gerada, porque será cancelada enquanto espera na fila. "
    "Ela tem várias frases, para que o texto seja dividido em mais de um segmento pelo servidor. "
    "Se algum destes segmentos chegar ao motor, o teste falha e mostra quantas linhas foram geradas."
)


async def test_a_job_cancelled_while_queued_never_runs_and_the_worker_goes_on(
    fake_runpod: FakeRunPod, gcs_worker: E2EWorker, gcs_bucket
):
    from batching.text import split_text
    from testing.faulty_worker import GATE

    segments = len(split_text(LONG_TEXT, "pt"))
    assert segments >= 2
    await wait_for_metrics(gcs_worker, lambda m: m.in_flight == 0, "an idle worker")
    before = await gcs_worker.metrics()
    gate = gcs_worker.gate_file
    assert gate is not None, "the module's worker runs behind a gate (tests/e2e/conftest.py)"

    # 1. Occupy the engine: one job whose batch waits at the gate until this test opens it. No time window: the
    #    engine stays busy for as long as the next steps take, on a fast machine or a slow one.
    gate.touch()
    try:
        blocker = fake_runpod.enqueue({"gen_text": "Segura o motor.", "ref_audio_url": ANA.url,
                                       "voice_id": ANA.voice_id, "language": "pt", "seed": GATE})  # fmt: skip
        for _ in range(int(RUN_TIMEOUT_S / 0.1)):
            if "faulty_worker: held at the gate" in gcs_worker.log_text() or not gcs_worker.alive:
                break
            await asyncio.sleep(0.1)
        assert "faulty_worker: held at the gate" in gcs_worker.log_text(), "the blocking batch never started"

        # 2. The long job of the same voice: its rows wait in the worker's queue behind the held batch.
        target = fake_runpod.enqueue(
            {"gen_text": LONG_TEXT, "ref_audio_url": ANA.url, "voice_id": ANA.voice_id, "language": "pt"}
        )
        queued = await wait_for_metrics(
            gcs_worker, lambda m: m.queue_depth >= segments,
            f"the long job's {segments} segments to wait in the queue behind the blocking batch",
        )  # fmt: skip
        assert fake_runpod.jobs[target].state == "IN_PROGRESS"
        assert queued.minus(before).batch_rows == 0  # the engine has not run one decoding step since

        # 3. Cancel it: RunPod sends the id on the job-stop channel; the SDK cancels the handler's task.
        assert fake_runpod.cancel(target) == "stopping"
        stopped = await wait_for_metrics(
            gcs_worker, lambda m: m.minus(before).jobs("cancelled") == 1 and m.queue_depth == 0,
            "the worker to drop the cancelled job",
        )  # fmt: skip
        assert fake_runpod.jobs[target].stop_sent
        assert stopped.minus(before).batch_rows == 0  # still held: nothing of the long job can have run
    finally:
        gate.unlink(missing_ok=True)  # 4. open the gate: the blocking batch finishes

    # 4. The worker goes on: the blocking job completes, and new jobs are served.
    follow_ups = [
        {"gen_text": "Depois do cancelamento.", "ref_audio_url": voice.url, "voice_id": voice.voice_id,
         "language": "pt", "output_format": fmt}
        for voice, fmt in ((JOAO, "wav"), (MARIA, "flac"), (ANA, "mp3"))
    ]  # fmt: skip
    await fake_runpod.wait_done([blocker], RUN_TIMEOUT_S)
    jobs = await run_jobs(fake_runpod, gcs_worker, follow_ups)
    for job in [fake_runpod.jobs[blocker], *jobs]:
        await check_completed(job, gcs_bucket.url)

    # The cancelled job posted nothing, not even late, and none of its rows ever reached the engine: every row
    # the engine generated belongs to the blocking job or to the follow-ups.
    await wait_for_metrics(gcs_worker, lambda m: m.in_flight == 0, "an idle worker")
    delta = (await gcs_worker.metrics()).minus(before)
    job = fake_runpod.jobs[target]
    assert job.state == CANCELLED and job.result is None and job.late_results == [] and job.result_posts == 0
    assert delta.rows_admitted == 1 + len(follow_ups), delta.batch_size_counts()
    assert delta.jobs("cancelled") == 1 and delta.jobs("completed") == 1 + len(follow_ups)
    assert f"[{target}] job stopped by RunPod" in gcs_worker.log_text()
    print(f"\ncancel: long job of {segments} segments queued (queue depth {queued.queue_depth:g}) behind a batch "
          f"held at the gate, cancelled; queue depth after the stop {stopped.queue_depth:g}; rows admitted "
          f"since: {delta.rows_admitted:g} (= 1 blocker + {len(follow_ups)} follow-ups)")  # fmt: skip
