"""The scheduler with a fake engine and a hand-moved clock: grouping, caps, order, cancellation, failures."""

import asyncio

import pytest

from batching.errors import BatchError, FatalEngineError, OutOfMemoryError
from batching.latents import LatentCache
from batching.scheduler import JobTimeoutError, Observer, Scheduler
from testing.fake_engine import SAMPLES_PER_CHAR, Clock, FakeEngine, request, settle, spoken


@pytest.fixture
def fake_engine():
    """The engine `make_scheduler` (tests/batching/conftest.py) builds a scheduler around by default."""
    return FakeEngine


async def test_a_request_is_split_and_rejoined_in_order(make_scheduler):
    s, engine = await make_scheduler()
    result = await s.submit(request("one|two|three"))
    assert result.segments == 3
    assert spoken(result.wav) == "onetwothree"  # every segment, once, in the text's order
    assert engine.batches == [["one", "two", "three"]]
    assert result.batch_sizes == (3, 3, 3)
    assert result.sample_rate == 1000
    assert result.duration_s == len("onetwothree") * SAMPLES_PER_CHAR / 1000


async def test_segments_batched_with_other_jobs_are_rejoined_in_their_own_order(make_scheduler):
    """Several multi-segment requests of two voices, each spread over several batches that mix its rows with
    other requests' rows: each result spells its own text, its segments in order."""
    engine = FakeEngine()
    s, _ = await make_scheduler(engine, max_batch_size=3, batch_wait_s=0.0)
    for voice in "AB":  # latents first (conditioning runs on the engine thread too)
        await s.submit(request("warm", voice))
    engine.batches.clear()
    engine.gate.clear()  # hold the engine in a first batch while every other request queues behind it
    blocker = asyncio.create_task(s.submit(request("hold", "A")))
    await settle(lambda: s.queue_depth == 0 and not s.idle)
    texts = [("one|two|three|four", "A"), ("alpha|beta", "B"), ("uno|dos|tres", "A"),
             ("red|green|blue|cyan|pink", "B"), ("solo", "A")]  # fmt: skip
    jobs, queued = [], 0
    for text, voice in texts:
        jobs.append(asyncio.create_task(s.submit(request(text, voice))))
        queued += text.count("|") + 1
        await settle(lambda: s.queue_depth == queued)  # a known arrival order
    engine.gate.set()
    results = await asyncio.gather(*jobs)
    await blocker

    assert [spoken(r.wav) for r in results] == [text.replace("|", "") for text, _ in texts]
    assert [r.segments for r in results] == [4, 2, 3, 5, 1]
    # The case it is about did happen: requests spread over several batches, batches mixing requests.
    owner = {seg: n for n, (text, _) in enumerate(texts) for seg in text.split("|")}
    batches = [b for b in engine.batches if b != ["hold"]]
    assert any(len({owner[t] for t in b}) > 1 for b in batches), batches
    assert all(len(r.batch_sizes) == r.segments for r in results)
    assert any(len({id(b) for b in batches if any(owner[t] == n for t in b)}) > 1 for n in range(len(texts)))


async def test_the_vocoder_time_of_each_batch_goes_to_the_observer(make_scheduler):
    class Recorder(Observer):
        def __init__(self):
            self.vocoder = []

        def vocoder_done(self, seconds):
            self.vocoder.append(seconds)

    engine = FakeEngine()
    engine.last_vocoder_s = 0.25
    observer = Recorder()
    s, _ = await make_scheduler(engine, observer=observer, max_batch_size=2)
    result = await s.submit(request("one|two|three"))
    assert engine.batches == [["one", "two"], ["three"]] and observer.vocoder == [0.25, 0.25]
    assert spoken(result.wav) == "onetwothree"  # joined in order across two batches


async def test_same_voice_rows_are_grouped_and_the_size_is_capped(make_scheduler):
    engine = FakeEngine()
    s, _ = await make_scheduler(engine, max_batch_size=3, batch_wait_s=0.0)
    for voice in "ABZ":  # conditioning runs on the engine thread too: have the latents ready first
        await s.submit(request("warm", voice))
    engine.batches.clear()
    engine.gate.clear()  # the first job's batch holds the engine while the others queue up
    blocker = asyncio.create_task(s.submit(request("z0", "Z")))
    await settle(lambda: s.queue_depth == 0 and not s.idle)
    order = [("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B"), ("a3", "A"), ("a4", "A")]
    jobs = []
    for text, voice in order:
        jobs.append(asyncio.create_task(s.submit(request(text, voice))))
        await settle(lambda: s.queue_depth == len(jobs))
    engine.gate.set()
    results = await asyncio.gather(blocker, *jobs)
    assert [spoken(r.wav) for r in results] == ["z0"] + [text for text, _ in order]  # each its own audio
    assert engine.batches[0] == ["z0"]
    assert engine.batches[1] == ["a1", "a2", "a3"]  # the oldest's voice first, oldest first, at most 3
    assert sorted(engine.batches[2]) == ["a4", "b1", "b2"]  # then the rest, filled with the other voice


async def test_waits_for_company_up_to_the_wait_cap(make_scheduler):
    clock = Clock()
    s, engine = await make_scheduler(clock=clock, max_batch_size=4, batch_wait_s=30.0)
    first = asyncio.create_task(s.submit(request("x1")))
    await settle(lambda: s.queue_depth == 1)
    second = asyncio.create_task(s.submit(request("x2")))
    await settle(lambda: s.queue_depth == 2)
    await asyncio.sleep(0.2)
    assert engine.batches == []  # waiting for company: the hand-moved clock has not reached the wait cap
    clock.now += 30.0
    s.poke()
    await asyncio.gather(first, second)
    assert engine.batches == [["x1", "x2"]]


async def test_a_full_batch_does_not_wait(make_scheduler):
    s, engine = await make_scheduler(max_batch_size=2, batch_wait_s=3600.0)
    await asyncio.gather(s.submit(request("p")), s.submit(request("q")))
    assert [sorted(batch) for batch in engine.batches] == [["p", "q"]]  # rows in arrival order (text prep is threaded)


async def test_a_cancelled_request_leaves_the_queue_before_its_batch(make_scheduler):
    clock = Clock()
    s, engine = await make_scheduler(clock=clock, max_batch_size=8, batch_wait_s=60.0)
    keep = asyncio.create_task(s.submit(request("keep")))
    gone = asyncio.create_task(s.submit(request("gone1|gone2")))
    await settle(lambda: s.queue_depth == 3)
    gone.cancel()
    await settle(lambda: s.queue_depth == 1)
    clock.now += 60.0
    s.poke()
    await keep
    assert engine.batches == [["keep"]]
    assert gone.cancelled()


async def test_a_timed_out_request_is_dropped_with_a_clear_error(make_scheduler):
    clock = Clock()
    s, engine = await make_scheduler(clock=clock, max_batch_size=8, batch_wait_s=60.0)
    late = asyncio.create_task(s.submit(request("late", deadline=clock.now + 5)))
    ok = asyncio.create_task(s.submit(request("ok")))
    await settle(lambda: s.queue_depth == 2)
    clock.now += 60.0
    s.poke()
    with pytest.raises(JobTimeoutError, match="timed out"):
        await late
    await ok
    assert engine.batches == [["ok"]]


async def test_a_failing_row_fails_alone(make_scheduler):
    s, engine = await make_scheduler(max_batch_size=4, batch_wait_s=3600.0)
    results = await asyncio.gather(*(s.submit(request(t)) for t in ["r1", "FAIL", "r3", "r4"]),
                                   return_exceptions=True)  # fmt: skip
    assert isinstance(results[1], BatchError) and "this row is broken" in str(results[1])
    assert [spoken(r.wav) for i, r in enumerate(results) if i != 1] == ["r1", "r3", "r4"]
    assert sorted(engine.batches[0]) == ["FAIL", "r1", "r3", "r4"]  # tried together (in arrival order), then split
    assert ["FAIL"] in engine.batches


async def test_a_nan_row_fails_alone(make_scheduler):
    s, _ = await make_scheduler(max_batch_size=2, batch_wait_s=3600.0)
    good, bad = await asyncio.gather(s.submit(request("fine")), s.submit(request("NAN!")), return_exceptions=True)
    assert spoken(good.wav) == "fine"
    assert isinstance(bad, BatchError) and "non-finite" in str(bad)


async def test_an_out_of_memory_batch_is_halved(make_scheduler):
    engine = FakeEngine(oom_above=2)
    s, _ = await make_scheduler(engine, max_batch_size=8, batch_wait_s=3600.0)
    results = await asyncio.gather(*(s.submit(request(f"m{i}")) for i in range(8)))
    assert [spoken(r.wav) for r in results] == [f"m{i}" for i in range(8)]
    assert [len(b) for b in engine.batches] == [8, 4, 2, 2, 4, 2, 2]


async def test_multi_segment_requests_survive_out_of_memory_halving_in_order(make_scheduler):
    engine = FakeEngine(oom_above=2)
    s, _ = await make_scheduler(engine, max_batch_size=8, batch_wait_s=3600.0)
    texts = ["ab|cd|ef", "gh|ij", "kl|mn|op"]  # 8 rows: one batch, halved to 4, then to pairs
    results = await asyncio.gather(*(s.submit(request(t)) for t in texts))
    assert [spoken(r.wav) for r in results] == [t.replace("|", "") for t in texts]
    assert [len(b) for b in engine.batches] == [8, 4, 2, 2, 4, 2, 2]


async def test_a_single_row_out_of_memory_fails_clearly(make_scheduler):
    engine = FakeEngine(oom_above=0)
    s, _ = await make_scheduler(engine)
    with pytest.raises(OutOfMemoryError, match="did not fit in GPU memory"):
        await s.submit(request("big"))


async def test_a_fatal_device_error_fails_everything_and_calls_on_fatal(make_scheduler):
    fatal = []
    s, _ = await make_scheduler(on_fatal=fatal.append, max_batch_size=2, batch_wait_s=3600.0)
    results = await asyncio.gather(s.submit(request("FATAL")), s.submit(request("x")), return_exceptions=True)
    assert all(isinstance(r, FatalEngineError) for r in results)
    assert len(fatal) == 1 and "illegal memory access" in str(fatal[0])
    with pytest.raises(Exception, match="shutting down"):
        await s.submit(request("after"))


async def test_conditioning_runs_once_for_sixteen_concurrent_jobs_of_a_new_voice(make_scheduler):
    s, engine = await make_scheduler(max_batch_size=16, batch_wait_s=3600.0)
    results = await asyncio.gather(*(s.submit(request(f"j{i}", voice="new")) for i in range(16)))
    assert [spoken(r.wav) for r in results] == [f"j{i}" for i in range(16)]
    assert len(engine.conditioned) == 1
    assert sum(not r.latent_cache_hit for r in results) == 1
    assert [sorted(batch) for batch in engine.batches] == [sorted(f"j{i}" for i in range(16))]


async def test_the_model_is_only_touched_from_one_engine_thread(make_scheduler):
    s, engine = await make_scheduler()
    await asyncio.gather(*(s.submit(request(f"t{i}", voice=f"v{i % 3}")) for i in range(9)))
    assert len(engine.threads) == 1 and next(iter(engine.threads)).startswith("engine")


async def test_progress_is_reported_per_segment(make_scheduler):
    progress = []
    s, _ = await make_scheduler(max_batch_size=1)
    result = await s.submit(request("a|b|c", on_progress=lambda done, total: progress.append((done, total))))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert spoken(result.wav) == "abc"


async def test_close_fails_waiting_requests_with_a_retryable_error(make_scheduler):
    clock = Clock()
    s, _ = await make_scheduler(clock=clock, batch_wait_s=3600.0)
    job = asyncio.create_task(s.submit(request("w")))
    await settle(lambda: s.queue_depth == 1)
    await s.close()
    with pytest.raises(Exception, match="shutting down") as err:
        await job
    assert err.value.retryable


async def test_a_disabled_latent_cache_conditions_every_request(tmp_path):
    engine = FakeEngine()
    s = Scheduler(engine, LatentCache(16, tmp_path, "test", enabled=False), max_batch_size=4, batch_wait_s=0.0)
    await s.start()
    try:
        results = [await s.submit(request(f"r{i}", voice="same")) for i in range(3)]
    finally:
        await s.close()
    assert len(engine.conditioned) == 3
    assert not any(r.latent_cache_hit for r in results)
    assert list(tmp_path.iterdir()) == []
