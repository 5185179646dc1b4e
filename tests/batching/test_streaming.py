"""Streamed requests (Scheduler.stream, batching.streaming): the chunks, joined, are the request's audio, equal to
what `submit` gives for the same seed, across segment joins and speeds; chunks grow; a caller that leaves frees
its rows at the next step."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import numpy as np
import pytest

from batching.audio import JOIN_FADE_S, join_segments
from batching.engine import SamplingParams
from batching.latents import LatentCache
from batching.scheduler import Scheduler, SpeechRequest, SpeechResult, StreamSettings
from batching.streaming import AudioChunk, StreamJoiner
from testing.voices import synthetic_voice

SR = 24000
# Three sentences each, long enough that no two merge into one segment: three segments per text.
TEXTS = {
    "ja": "今日はとても良い天気ですね、みんなで散歩に行きましょう、公園まで歩いて行きます。明日は雨が降るかもしれないので、"
    "出かけるときは傘を持って行ったほうがいいです。週末には友達と一緒に映画を見に行く予定があります、とても楽しみにしています。",
    "zh-cn": "今天天气很好，我们一起去公园散步吧，那里有很多漂亮的花和高高的树，还有一个很大很大的湖。明天可能会下雨，所以出门的"
    "时候最好带上一把伞，也要穿暖和一点的衣服再出去外面走走看看。周末我和朋友们打算一起去看一场电影，然后去一家新开的饭馆吃晚饭，"
    "聊聊天再慢慢地走回家去。",
}


def _cut(wav: np.ndarray, rng: random.Random) -> list[np.ndarray]:
    cuts = sorted(rng.sample(range(1, len(wav)), min(len(wav) - 1, rng.randint(0, 6)))) if len(wav) > 1 else []
    return np.split(wav, cuts)


@pytest.mark.parametrize("seed", range(40))
def test_the_joiner_gives_what_join_segments_gives(seed):
    """Segments of any length (tiny ones included, shorter than two fades) arrive in pieces, out of order across
    segments; the chunks given out, in order, are join_segments' output sample for sample."""
    rng = random.Random(seed)
    fade = int(JOIN_FADE_S * SR)
    lengths = [rng.choice([1, 7, fade, 2 * fade - 1, 2 * fade, 3 * fade + 5, 5000]) for _ in range(rng.randint(1, 4))]
    wavs = [np.random.default_rng(seed * 10 + i).uniform(-1, 1, n).astype(np.float32) for i, n in enumerate(lengths)]
    pieces = [[(i, p) for p in _cut(w, rng)] for i, w in enumerate(wavs)]
    joiner = StreamJoiner(len(wavs), SR)
    chunks = []
    while any(pieces):
        i = rng.choice([k for k, p in enumerate(pieces) if p])
        index, piece = pieces[i].pop(0)
        chunk = joiner.add(index, piece, ended=not pieces[i])
        if chunk is not None:
            assert chunk.start == sum(len(c.samples) for c in chunks) and chunk.index == len(chunks)
            chunks.append(chunk)
    assert joiner.done
    joined = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
    np.testing.assert_array_equal(joined, join_segments(wavs, SR))
    np.testing.assert_array_equal(joiner.audio(), joined)


async def _load():
    return synthetic_voice(seconds=3.0), 22050


async def _streamed(scheduler, text, language, params):
    chunks, result = [], None
    async for item in scheduler.stream(SpeechRequest(text, language, "v", _load, params, stream=True)):
        if isinstance(item, AudioChunk):
            assert result is None
            chunks.append(item)
        else:
            result = item
    assert isinstance(result, SpeechResult)
    return chunks, result


@pytest.mark.slow
@pytest.mark.parametrize("language", ["ja", "zh-cn"])
async def test_streamed_chunks_are_the_audio_submit_gives(tiny_engine, language):
    """Three segments, speeds 1.0 and 1.3, seeded: the chunks joined equal `submit`'s audio (continuous and static
    scheduling) within 1e-3; they start 0.5 s long and grow; the result is exactly the chunks joined; the vocoder
    ran on at most 1.2x the frames it gave."""
    text = TEXTS[language]
    assert len(tiny_engine.prepare_text(text, language)) == 3
    spans = []

    class Spy:
        def __getattr__(self, name):
            return lambda *a: spans.append(a) if name == "span_vocoded" else None

    streaming = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=4, batch_wait_s=0.0,
                          observer=Spy(), stream_settings=StreamSettings(0.5, 8.0))  # fmt: skip
    static = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=4, batch_wait_s=0.0,
                       scheduling="static")  # fmt: skip
    await streaming.start()
    await static.start()
    try:
        for speed in (1.0, 1.3):
            params = SamplingParams(seed=11, speed=speed)
            whole = await streaming.submit(SpeechRequest(text, language, "v", _load, params))
            chunks, result = await _streamed(streaming, text, language, params)
            joined = np.concatenate([c.samples for c in chunks])
            assert len(joined) == len(whole.wav)
            np.testing.assert_allclose(joined, whole.wav, rtol=0, atol=1e-3)
            np.testing.assert_array_equal(result.wav, joined)
            assert result.segments == 3
            # 0.5 s less the held-back tail fade (5 ms); the next chunk twice as long; later segments, decoded
            # meanwhile and vocoded whole, follow in larger chunks.
            assert abs(chunks[0].duration_s - 0.5) < 0.01 and len(chunks) >= 3
            assert chunks[1].duration_s > 1.5 * chunks[0].duration_s
            static_chunks, _ = await _streamed(static, text, language, params)  # whole segments, same audio
            np.testing.assert_allclose(np.concatenate([c.samples for c in static_chunks]), joined, rtol=0,
                                       atol=1e-3)  # fmt: skip
    finally:
        await streaming.close()
        await static.close()
    vocoded = sum(s[1] for s in spans)
    given = sum(s[2] for s in spans)
    assert given > 0 and vocoded <= 1.2 * given, (vocoded, given)
    assert streaming.idle


@pytest.mark.slow
async def test_a_row_streamed_on_the_static_cache_is_the_dynamic_caches_whole_audio(tiny_engine, tiny_static_engine):
    """XTTS_KV_CACHE=static streamed (three segments, seeded) against the dynamic cache's `submit`: the same audio
    within 1e-3, so streaming on the preallocated slots (the default on CUDA) changes nothing either."""
    text, language, params = TEXTS["ja"], "ja", SamplingParams(seed=11)
    dynamic = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=4, batch_wait_s=0.0)
    static = Scheduler(tiny_static_engine, LatentCache(8, None, "t"), max_batch_size=4, batch_wait_s=0.0,
                       stream_settings=StreamSettings(0.5, 8.0))  # fmt: skip
    await dynamic.start()
    await static.start()
    try:
        whole = await dynamic.submit(SpeechRequest(text, language, "v", _load, params))
        chunks, result = await _streamed(static, text, language, params)
    finally:
        await dynamic.close()
        await static.close()
    joined = np.concatenate([c.samples for c in chunks])
    assert len(chunks) >= 3 and len(joined) == len(whole.wav) and result.segments == 3
    np.testing.assert_allclose(joined, whole.wav, rtol=0, atol=1e-3)
    assert static.idle and tiny_static_engine.running == ()


@pytest.mark.slow
async def test_a_caller_that_leaves_mid_stream_frees_its_rows(tiny_engine):
    scheduler = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=4, batch_wait_s=0.0)
    await scheduler.start()
    try:
        params = SamplingParams(seed=3)
        stream = scheduler.stream(SpeechRequest(TEXTS["ja"], "ja", "v", _load, params, stream=True))
        first = await anext(stream)
        assert isinstance(first, AudioChunk) and first.index == 0
        assert scheduler.running_rows > 0  # the other segments still decode
        await stream.aclose()
        for _ in range(200):
            if scheduler.idle:
                break
            await asyncio.sleep(0.05)
        assert scheduler.idle and scheduler.running_rows == 0 and scheduler.queue_depth == 0
        # The engine serves the next request normally.
        chunks, result = await _streamed(scheduler, "Olá!", "pt", params)
        assert chunks and result.duration_s > 0
    finally:
        await scheduler.close()


async def test_a_request_that_fails_raises_after_its_chunks(tiny_engine, monkeypatch):
    scheduler = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=4, batch_wait_s=0.0)
    await scheduler.start()
    calls = []
    real = tiny_engine.vocode_span

    def failing(vocoder, latents, final, max_frames):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("vocoder broke")
        return real(vocoder, latents, final, max_frames)

    monkeypatch.setattr(tiny_engine, "vocode_span", failing)
    try:
        got = []
        with pytest.raises(Exception, match="vocoder broke"):
            async for item in scheduler.stream(SpeechRequest(TEXTS["ja"], "ja", "v", _load,
                                                             SamplingParams(seed=1), stream=True)):  # fmt: skip
                got.append(item)
        assert [type(i) for i in got] == [AudioChunk]
        assert scheduler.idle or await _wait_idle(scheduler)
    finally:
        await scheduler.close()


async def _wait_idle(scheduler) -> bool:
    for _ in range(200):
        if scheduler.idle:
            return True
        await asyncio.sleep(0.05)
    return False


def test_stream_settings_are_checked():
    with pytest.raises(ValueError, match="first <= max"):
        StreamSettings(2.0, 1.0)
    assert dataclasses.asdict(StreamSettings()) == {"first_s": 0.5, "max_s": 8.0, "buffer_s": 60.0}
    with pytest.raises(ValueError, match="unread-audio bound"):
        StreamSettings(buffer_s=0.0)


@pytest.mark.slow
async def test_a_stream_waiting_for_a_row_takes_one_from_a_later_segment_that_restarts_with_the_same_audio(
    tiny_engine,
):
    """Two rows, both taken by stream A's first two segments (its third waits): stream B's first segment takes
    the row of A's second segment, whose audio is needed seconds later (the clock is frozen, so it stays so),
    instead of waiting for a row to finish. A's second segment restarts from its prompt afterwards; both
    streams' audio is what `submit` gives for the same seeds, and the row went back to the queue only once."""
    preempted = []

    class Spy:
        def __getattr__(self, name):
            return lambda *a: preempted.append(a[0]) if name == "rows_preempted" else None

    now = [100.0]
    scheduler = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=2, batch_wait_s=0.0,
                          clock=lambda: now[0], observer=Spy())  # fmt: skip
    await scheduler.start()
    a_params, b_params = SamplingParams(seed=21), SamplingParams(seed=22)
    try:
        a_whole = await scheduler.submit(SpeechRequest(TEXTS["ja"], "ja", "v", _load, a_params))  # latents cached
        b_whole = await scheduler.submit(SpeechRequest(TEXTS["zh-cn"], "zh-cn", "v", _load, b_params))
        assert not preempted
        # Hold the engine thread, so that B arrives while A's first two segments hold both rows.
        gate = asyncio.ensure_future(scheduler.run_on_engine(time.sleep, 1.0))
        a = asyncio.ensure_future(_streamed(scheduler, TEXTS["ja"], "ja", a_params))
        for _ in range(100):
            if scheduler.running_rows == 2:
                break
            await asyncio.sleep(0.01)
        assert scheduler.running_rows == 2 and scheduler.queue_depth == 1
        b = asyncio.ensure_future(_streamed(scheduler, TEXTS["zh-cn"], "zh-cn", b_params))
        await gate
        (a_chunks, a_result), (b_chunks, b_result) = await asyncio.gather(a, b)
    finally:
        await scheduler.close()
    assert preempted == [1]
    for chunks, result, whole in ((a_chunks, a_result, a_whole), (b_chunks, b_result, b_whole)):
        joined = np.concatenate([c.samples for c in chunks])
        assert len(joined) == len(whole.wav)
        np.testing.assert_allclose(joined, whole.wav, rtol=0, atol=1e-3)
        assert result.segments == 3


async def test_a_stalled_reader_pauses_its_stream_and_resumes_with_the_same_audio(tiny_engine):
    """One row at a time, a 0.2 s bound on unread audio: a caller that takes the first chunk and then stops
    leaves its stream paused once its running segment is done: no row runs, its two later segments wait, and the
    unread audio is at most the bound plus one segment. Reading on resumes it; the chunks joined are what `submit`
    gives for the same seed."""
    scheduler = Scheduler(tiny_engine, LatentCache(8, None, "t"), max_batch_size=1, batch_wait_s=0.0,
                          stream_settings=StreamSettings(0.5, 8.0, buffer_s=0.2))  # fmt: skip
    await scheduler.start()
    try:
        params = SamplingParams(seed=5)
        whole = await scheduler.submit(SpeechRequest(TEXTS["ja"], "ja", "v", _load, params))
        stream = scheduler.stream(SpeechRequest(TEXTS["ja"], "ja", "v", _load, params, stream=True))
        chunks = [await anext(stream)]
        for _ in range(400):
            if scheduler.running_rows == 0 and not scheduler._busy:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a paused stream stays paused
        assert scheduler.running_rows == 0 and scheduler.queue_depth == 2
        (request,) = {row.request for row in scheduler._waiting}
        assert request.paused and 0.2 < request.unread_s <= 0.2 + whole.duration_s / 2
        async for item in stream:
            if isinstance(item, AudioChunk):
                chunks.append(item)
            else:
                result = item
        joined = np.concatenate([c.samples for c in chunks])
        np.testing.assert_allclose(joined, whole.wav, rtol=0, atol=1e-3)
        np.testing.assert_array_equal(result.wav, joined)
        assert scheduler.idle or await _wait_idle(scheduler)
    finally:
        await scheduler.close()
