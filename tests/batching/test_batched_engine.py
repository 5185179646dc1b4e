"""Batched decoding on the real engine (tiny demo checkpoint): equal to stock XTTS, row by row."""

import asyncio

import numpy as np
import pytest
import torch

from batching.engine import SamplingParams, Segment
from batching.latents import LatentCache, model_fingerprint
from batching.scheduler import Scheduler, SpeechRequest
from testing.stock_reference import stock_inference
from testing.tolerances import WAVEFORM_TOLERANCE
from testing.voices import synthetic_voice

# 9 segments, 3 languages, lengths from 4 to 43 audio tokens (short: the CPU vocoder costs ~1 s per audio second).
MIXED = [
    ("Hello.", "en"),
    ("A longer English sentence, this one.", "en"),
    ("Olá, tudo bem?", "pt"),
    ("Uma frase de tamanho médio.", "pt"),
    ("Привет!", "ru"),
    ("Это предложение длиннее.", "ru"),
    ("Ok", "en"),
    ("Mais uma, com vírgulas.", "pt"),
    ("Спасибо, друзья.", "ru"),
]


@pytest.fixture(scope="module")
def voices(tiny_engine):
    return [tiny_engine.condition(synthetic_voice(3.0, f0=f0, seed=i), 22050) for i, f0 in enumerate((110, 220))]


def test_greedy_batch_equals_stock_inference_row_by_row(tiny_engine, tiny_stock_engine, voices):
    greedy = SamplingParams(do_sample=False)
    segments = [Segment(tiny_engine.tokenize(t, lang), len(t), voices[i % 2], greedy) for i, (t, lang) in enumerate(MIXED)]
    batched = tiny_engine.generate(segments)
    lengths = {len(a.codes) for a in batched}
    assert len(lengths) >= 6  # really mixed lengths in one batch
    for i, ((text, lang), audio) in enumerate(zip(MIXED, batched, strict=True)):
        codes, wav = stock_inference(tiny_stock_engine, text, lang, voices[i % 2], do_sample=False,
                                     repetition_penalty=5.0)  # fmt: skip
        np.testing.assert_array_equal(audio.codes, codes, err_msg=f"row {i}: {text!r}")
        assert audio.wav.shape == wav.shape
        assert np.abs(audio.wav - wav).max() < WAVEFORM_TOLERANCE, f"row {i}"


def test_a_seeded_request_is_the_same_alone_and_in_a_mixed_batch(tiny_engine, voices):
    text = "Same audio, whatever the neighbours."
    seeded = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=2.0, seed=1234)
    row = Segment(tiny_engine.tokenize(text, "en"), len(text), voices[0], seeded)
    (alone,) = tiny_engine.generate([row])
    neighbours = [
        Segment(tiny_engine.tokenize(t, lang), len(t), voices[1],
                SamplingParams(temperature=0.3 + 0.1 * i, top_k=5 + i, top_p=0.5, repetition_penalty=1.0 + i, seed=None))
        for i, (t, lang) in enumerate(MIXED[:5])
    ]  # fmt: skip
    batch = tiny_engine.generate(neighbours[:3] + [row] + neighbours[3:])
    np.testing.assert_array_equal(batch[3].codes, alone.codes)
    assert np.abs(batch[3].wav - alone.wav).max() < WAVEFORM_TOLERANCE
    (other_seed,) = tiny_engine.generate([Segment(row.tokens, row.n_chars, row.voice, SamplingParams(seed=99))])
    assert not np.array_equal(other_seed.codes, alone.codes)


def test_sampling_honours_top_k_one_as_greedy(tiny_engine, voices):
    text = "Top k of one is greedy."
    tokens = tiny_engine.tokenize(text, "en")
    (greedy,) = tiny_engine.generate([Segment(tokens, len(text), voices[0], SamplingParams(do_sample=False))])
    (top1,) = tiny_engine.generate([Segment(tokens, len(text), voices[0], SamplingParams(top_k=1, seed=5))])
    np.testing.assert_array_equal(top1.codes, greedy.codes)


class CountingEngine:
    """The real engine, counting conditioning calls."""

    def __init__(self, engine):
        self._engine = engine
        self.conditioned = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def condition(self, wav, sr):
        self.conditioned += 1
        return self._engine.condition(wav, sr)


async def test_conditioning_once_for_16_jobs_and_never_after_a_restart(tiny_engine, tiny_checkpoint, voice_wav, tmp_path):
    async def load_reference():
        return voice_wav, 22050

    def job(i):
        return SpeechRequest(text=f"Pedido número {i}.", language="pt", voice_key="voice-abc",
                             load_reference=load_reference, params=SamplingParams(seed=i))  # fmt: skip

    model_id = model_fingerprint(tiny_checkpoint)
    engine = CountingEngine(tiny_engine)
    scheduler = Scheduler(engine, LatentCache(8, tmp_path, model_id), max_batch_size=16, batch_wait_s=0.05)
    await scheduler.start()
    try:
        results = await asyncio.gather(*(scheduler.submit(job(i)) for i in range(16)))
    finally:
        await scheduler.close()
    assert engine.conditioned == 1
    assert [r.latent_cache_hit for r in results].count(False) == 1
    assert max(max(r.batch_sizes) for r in results) > 1
    assert all(np.isfinite(r.wav).all() and r.duration_s > 0 for r in results)

    # A restarted worker: new cache object, same folder.
    restarted = CountingEngine(tiny_engine)
    cache = LatentCache(8, tmp_path, model_id)
    scheduler = Scheduler(restarted, cache, max_batch_size=4, batch_wait_s=0.0)
    await scheduler.start()
    try:
        result = await scheduler.submit(job(0))
    finally:
        await scheduler.close()
    assert restarted.conditioned == 0
    assert result.latent_cache_hit and cache.disk_hits == 1
    # Same seed, same latents (from disk): same codes; the audio differs only by float rounding, as results[0]
    # was decoded in a batch of 16 and this one alone.
    assert result.wav.shape == results[0].wav.shape
    assert np.abs(result.wav - results[0].wav).max() < WAVEFORM_TOLERANCE


def test_batched_vocoder_equals_per_row_but_for_the_tail_of_padded_rows(tiny_engine, voices):
    texts = ["Short one.", "A rather longer sentence for the vocoder.", "Middle length."]
    segments = [Segment(tiny_engine.tokenize(t, "en"), len(t), voices[i % 2], SamplingParams(seed=i, speed=s))
                for i, (t, s) in enumerate(zip(texts, (1.0, 1.2, 0.8)))]  # fmt: skip
    saved = tiny_engine.vocoder_batched
    try:
        tiny_engine.vocoder_batched = False
        per_row = tiny_engine.generate(segments)
        tiny_engine.vocoder_batched = True
        batched = tiny_engine.generate(segments)
    finally:
        tiny_engine.vocoder_batched = saved
    tail = 4096  # ~0.17 s: where a padded row's convolutions see its padding
    for a, b in zip(per_row, batched, strict=True):
        np.testing.assert_array_equal(a.codes, b.codes)
        assert a.wav.shape == b.wav.shape
        assert np.abs(a.wav[:-tail] - b.wav[:-tail]).max() < WAVEFORM_TOLERANCE
        assert np.isfinite(b.wav).all()


# ------------------------------------------------------------------ reduced precision (XTTS_GPT_DTYPE=bfloat16)
# bf16 autocast rounds every GPT matmul to 8 bits of mantissa. The tiny random model's logits are nearly flat
# (std ~0.6 over 1026 codes), so near-ties are common and greedy codes can part from float32 after a few steps:
# measured on the 9 MIXED rows, 81% of codes equal float32's (one row parts at step 1), and 99.5% equal bf16
# decoded alone (one code of one row differs: a padded batch's matmuls round differently). Real checkpoints have
# far sharper logits; these bounds check that the bf16 path runs, stays batch-invariant but for rare near-ties,
# and really is bf16 (first-step latents differ from float32 by ~5e-4, where float32 rounding gives ~1e-7).
BF16_AGREEMENT_WITH_FP32 = 0.6
BF16_AGREEMENT_BATCH_VS_ALONE = 0.9


@pytest.fixture(scope="module")
def bf16_engine(tiny_engine):
    from batching.engine import XttsEngine, _autocast_dtype

    dtype = _autocast_dtype("bfloat16", "cpu")  # what XTTS_GPT_DTYPE=bfloat16 selects
    assert dtype is torch.bfloat16
    # The same model (its vocoder is already folded): only the GPT decode runs under autocast.
    return XttsEngine(tiny_engine.model, tiny_engine.device, demo=tiny_engine.demo, gpt_dtype=dtype,
                      length_rule=tiny_engine.length_rule)


def test_bf16_greedy_batch_is_batch_invariant_and_close_to_float32(tiny_engine, bf16_engine, voices):
    greedy = SamplingParams(do_sample=False)
    segments = [Segment(tiny_engine.tokenize(t, lang), len(t), voices[i % 2], greedy) for i, (t, lang) in enumerate(MIXED)]
    with torch.inference_mode():
        bf16, bf16_latents = bf16_engine._decode(segments)
        fp32, fp32_latents = tiny_engine._decode(segments)
        alone = [bf16_engine._decode([s])[0][0] for s in segments[::2]]  # every other row: time
    for i, (b, a) in enumerate(zip(bf16[::2], alone, strict=True)):
        assert len(b) == len(a) == tiny_engine.demo_length(len(MIXED[2 * i][0]))
        assert b[0] == a[0], f"row {2 * i}: the first code already depends on the batch"
    share_alone = np.mean(np.concatenate([b == a for b, a in zip(bf16[::2], alone, strict=True)]))
    share_fp32 = np.mean(np.concatenate([b == f for b, f in zip(bf16, fp32, strict=True)]))
    assert share_alone >= BF16_AGREEMENT_BATCH_VS_ALONE, share_alone
    assert share_fp32 >= BF16_AGREEMENT_WITH_FP32, share_fp32
    # Really bf16: the first step's latents (same input in both) differ by bf16 rounding, not float32's.
    step0 = max(float((b[0] - f[0]).abs().max()) for b, f in zip(bf16_latents, fp32_latents, strict=True))
    assert 1e-4 < step0 < 0.05, step0


def test_bf16_seeded_request_is_the_same_alone_and_in_a_mixed_batch(bf16_engine, voices):
    text = "Same audio, whatever the neighbours."
    seeded = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=2.0, seed=1234)
    row = Segment(bf16_engine.tokenize(text, "en"), len(text), voices[0], seeded)
    neighbours = [
        Segment(bf16_engine.tokenize(t, lang), len(t), voices[1],
                SamplingParams(temperature=0.3 + 0.1 * i, top_k=5 + i, top_p=0.5, repetition_penalty=1.0 + i, seed=i))
        for i, (t, lang) in enumerate(MIXED[:5])
    ]  # fmt: skip
    with torch.inference_mode():  # decoding only: the vocoder runs in float32 whatever XTTS_GPT_DTYPE says
        (alone,), (alone_latents,) = bf16_engine._decode([row])
        batch, batch_latents = bf16_engine._decode(neighbours[:3] + [row] + neighbours[3:])
    np.testing.assert_array_equal(batch[3], alone)
    # Measured: the row's latents come out bit-identical alone and in this batch; allow float32-level rounding.
    assert float((batch_latents[3] - alone_latents).abs().max()) < 1e-5
