"""Continuous scheduling with a fake step-level engine and a hand-moved clock: rows join and leave at step
boundaries, finished rows are vocoded between steps (the shortest first), gone rows are evicted at the next step,
failures stay small. And with the real engine: a seeded request gives the same audio continuous and static."""

import asyncio

import numpy as np
import pytest

from batching.engine import SamplingParams
from batching.errors import BatchError, FatalEngineError
from batching.latents import LatentCache
from batching.scheduler import JobTimeoutError, Observer, Scheduler, SpeechRequest
from testing.fake_engine import Clock, FakeStepEngine, request, settle
from testing.tolerances import WAVEFORM_TOLERANCE


class Recorder(Observer):
    def __init__(self):
        self.steps, self.admitted = [], []

    def step_done(self, rows, seconds, kv_positions, kv_budget):
        self.steps.append((rows, kv_positions, kv_budget))

    def rows_admitted(self, count):
        self.admitted.append(count)


@pytest.fixture
def fake_engine():
    """The engine `make_scheduler` (tests/batching/conftest.py) builds a scheduler around by default."""
    return FakeStepEngine


async def test_rows_join_the_running_batch_and_leave_when_done(make_scheduler):
    observer = Recorder()
    s, engine = await make_scheduler(FakeStepEngine(step_s=0.01), observer=observer, max_batch_size=4)
    assert s.continuous
    long = asyncio.create_task(s.submit(request("x" * 60)))
    await settle(lambda: len(engine.steps) >= 5)
    short = await s.submit(request("abc|de"))
    assert not long.done()  # the short request joined the running batch and finished while the long row ran
    assert short.segments == 2 and len(short.wav) == 5
    await long
    assert engine.admitted[0] == ["x" * 60] and ["abc", "de"] in engine.admitted
    assert max(len(step) for step in engine.steps) == 3
    assert engine.vocoded == ["de", "abc", "x" * 60]  # each as it finished; the shorter first
    assert sum(observer.admitted) == 3 and observer.steps[-1][:2] == (0, 0) and s.idle
    assert all(kv <= budget for _, kv, budget in observer.steps)


async def test_a_short_job_is_vocoded_before_long_rows_that_finished_earlier(make_scheduler):
    engine = FakeStepEngine(step_s=0.005, vocode_s=0.1)
    s, _ = await make_scheduler(engine, max_batch_size=8)
    longs = [asyncio.create_task(s.submit(request(f"long{i}" + "y" * 20))) for i in range(6)]
    await settle(lambda: len(engine.vocoded) >= 1)
    short = asyncio.create_task(s.submit(request("hi")))
    await asyncio.gather(short, *longs)
    assert engine.vocoded.index("hi") < len(engine.vocoded) - 1, engine.vocoded  # not behind every long row


async def test_the_row_budget_caps_the_running_batch(make_scheduler):
    s, engine = await make_scheduler(max_batch_size=2, batch_wait_s=3600.0)
    await asyncio.gather(*(s.submit(request(t)) for t in ["aaaa", "bb", "cccccc", "d"]))
    assert max(len(step) for step in engine.steps) == 2
    assert engine.admitted == [["aaaa", "bb"], ["cccccc"], ["d"]]


async def test_the_kv_budget_caps_the_running_batch(make_scheduler):
    # Reservations are 10 + len(text): two rows of 20 fit in 40 positions, a third does not.
    s, engine = await make_scheduler(FakeStepEngine(step_s=0.01), max_batch_size=8, max_batch_tokens=40)
    await asyncio.gather(*(s.submit(request("z" * 10 + str(i))) for i in range(4)))
    assert max(len(step) for step in engine.steps) == 1  # 2 x 21 > 40
    s2, engine2 = await make_scheduler(FakeStepEngine(step_s=0.01), max_batch_size=8, max_batch_tokens=42)
    await asyncio.gather(*(s2.submit(request("z" * 10 + str(i))) for i in range(4)))
    assert max(len(step) for step in engine2.steps) == 2


async def test_a_cancelled_request_is_evicted_at_the_next_step(make_scheduler):
    s, engine = await make_scheduler(FakeStepEngine(step_s=0.01))
    keep = asyncio.create_task(s.submit(request("k" * 30)))
    gone = asyncio.create_task(s.submit(request("g" * 500)))
    await settle(lambda: len(engine.steps) >= 3)
    gone.cancel()
    await keep
    assert gone.cancelled()
    assert engine.evicted == ["g" * 500]
    assert len(engine.steps) < 100 and "g" * 500 not in engine.vocoded


async def test_a_request_past_its_deadline_is_evicted_with_a_clear_error(make_scheduler):
    clock = Clock()
    s, engine = await make_scheduler(FakeStepEngine(step_s=0.01), clock=clock)
    late = asyncio.create_task(s.submit(request("l" * 500, deadline=clock.now + 5)))
    ok = asyncio.create_task(s.submit(request("o" * 40)))
    await settle(lambda: len(engine.steps) >= 3)
    clock.now += 10
    with pytest.raises(JobTimeoutError, match="timed out"):
        await late
    await ok
    assert engine.evicted == ["l" * 500]


async def test_a_failing_step_restarts_its_rows_in_halves_and_only_the_bad_row_fails(make_scheduler):
    s, engine = await make_scheduler(max_batch_size=4, batch_wait_s=3600.0)
    results = await asyncio.gather(*(s.submit(request(t)) for t in ["r1", "FAIL", "r3", "r4"]),
                                   return_exceptions=True)  # fmt: skip
    assert isinstance(results[1], BatchError) and "this row is broken" in str(results[1])
    assert [r.segments for i, r in enumerate(results) if i != 1] == [1, 1, 1]
    assert engine.steps[0] == ["r1", "FAIL", "r3", "r4"]
    assert engine.batches == [["r1", "FAIL"], ["r1"], ["FAIL"], ["r3", "r4"]]  # static retries, from the prompts


async def test_an_out_of_memory_step_shrinks_the_budget_and_readmits(make_scheduler):
    engine = FakeStepEngine(oom_above=2)
    s, _ = await make_scheduler(engine, max_batch_size=8, batch_wait_s=3600.0)
    results = await asyncio.gather(*(s.submit(request(f"m{i}")) for i in range(8)))
    assert all(r.segments == 1 for r in results)
    assert [len(a) for a in engine.admitted][:2] == [8, 4]
    assert max(len(step) for step in engine.steps if len(step) <= 2) == 2
    assert sorted(engine.vocoded) == sorted(f"m{i}" for i in range(8))


async def test_a_non_finite_row_fails_alone(make_scheduler):
    s, _ = await make_scheduler(max_batch_size=2, batch_wait_s=3600.0)
    good, bad = await asyncio.gather(s.submit(request("fine")), s.submit(request("NAN!")), return_exceptions=True)
    assert good.segments == 1
    assert isinstance(bad, BatchError) and "non-finite" in str(bad)


async def test_a_fatal_step_fails_everything_and_calls_on_fatal(make_scheduler):
    fatal = []
    s, _ = await make_scheduler(on_fatal=fatal.append, max_batch_size=2, batch_wait_s=3600.0)
    results = await asyncio.gather(s.submit(request("FATAL")), s.submit(request("xyz")), return_exceptions=True)
    assert all(isinstance(r, FatalEngineError) for r in results)
    assert len(fatal) == 1 and "illegal memory access" in str(fatal[0])
    with pytest.raises(Exception, match="shutting down"):
        await s.submit(request("after"))


async def test_static_scheduling_stays_selectable(make_scheduler):
    s, engine = await make_scheduler(scheduling="static", max_batch_size=4, batch_wait_s=3600.0)
    assert not s.continuous
    await asyncio.gather(*(s.submit(request(t)) for t in ["a", "bb", "ccc", "dddd"]))
    assert engine.batches == [["a", "bb", "ccc", "dddd"]] and engine.steps == []


def test_scheduling_is_checked():
    with pytest.raises(ValueError, match="SCHEDULING must be continuous or static, got 'eager'"):
        Scheduler(FakeStepEngine(), LatentCache(1, None, "t"), scheduling="eager")


async def test_a_seeded_request_gives_the_same_audio_continuous_and_static(tiny_engine, voice_wav):
    async def load():
        return voice_wav, 22050

    def job(text, seed):
        return SpeechRequest(text=text, language="en", voice_key="v", load_reference=load,
                             params=SamplingParams(seed=seed))  # fmt: skip

    texts = ["A longer sentence, to keep the batch busy.", "Short.", "Mid length row."]
    out = {}
    for mode in ("continuous", "static"):
        s = Scheduler(tiny_engine, LatentCache(4, None, "t"), max_batch_size=4, batch_wait_s=0.0, scheduling=mode)
        await s.start()
        try:
            first = asyncio.create_task(s.submit(job(texts[0], 1)))
            await asyncio.sleep(0.3)  # the others join later (continuous) or form the next batch (static)
            out[mode] = [await first, *await asyncio.gather(*(s.submit(job(t, i + 2)) for i, t in enumerate(texts[1:])))]
        finally:
            await s.close()
    for a, b in zip(out["continuous"], out["static"], strict=True):
        assert a.wav.shape == b.wav.shape
        assert np.abs(a.wav - b.wav).max() < WAVEFORM_TOLERANCE
