"""XTTS_ENGINE=stock, the seed's path used as the benchmark baseline: the same audio as stock `Xtts.inference`."""

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from batching.engine import SamplingParams, Segment
from batching.stock import StockEngine
from testing.stock_reference import stock_inference
from testing.voices import synthetic_voice


@pytest.fixture(scope="module")
def stock_engine(tiny_stock_engine):
    # Its own model: the session's tiny_engine has folded the vocoder's weight norm, which stock XTTS does not do.
    assert isinstance(tiny_stock_engine, StockEngine)
    return tiny_stock_engine


def test_keeps_the_vocoder_as_stock_xtts_loads_it(stock_engine):
    decoder = stock_engine.model.hifigan_decoder.waveform_decoder
    assert any(parametrize.is_parametrized(m, "weight") for m in decoder.modules())


@pytest.mark.parametrize(
    ("text", "language", "params"),
    [
        ("Olá, tudo bem com você?", "pt", SamplingParams(temperature=0.7, top_k=40, top_p=0.8, seed=7)),
        ("A longer English sentence, spoken a bit faster.", "en", SamplingParams(speed=1.25, seed=8)),
        ("Hello.", "en", SamplingParams(do_sample=False, repetition_penalty=2.0)),
    ],
)
def test_a_row_is_what_stock_inference_gives_for_the_same_seed(stock_engine, text, language, params):
    voice = stock_engine.condition(synthetic_voice(3.0, f0=140, seed=3), 22050)
    (row,) = stock_engine.generate([Segment(stock_engine.tokenize(text, language), len(text), voice, params)])
    torch.manual_seed(params.seed or 0)
    codes, wav = stock_inference(stock_engine, text, language, voice, temperature=params.temperature,
                                 top_k=params.top_k, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                                 speed=params.speed, do_sample=params.do_sample)  # fmt: skip
    np.testing.assert_array_equal(row.codes, codes)
    np.testing.assert_array_equal(row.wav, wav)


def test_rows_of_a_batch_are_decoded_one_after_the_other(stock_engine):
    voice = stock_engine.condition(synthetic_voice(3.0, f0=200, seed=4), 22050)
    texts = ["Um.", "Uma frase um pouco maior."]
    rows = [Segment(stock_engine.tokenize(t, "pt"), len(t), voice, SamplingParams(seed=i)) for i, t in enumerate(texts)]
    batch = stock_engine.generate(rows)
    assert stock_engine.last_vocoder_s > 0  # both rows' HiFi-GAN time, for metrics
    alone = [stock_engine.generate([r])[0] for r in rows]
    assert [len(a.codes) for a in batch] == [stock_engine.demo_length(len(t)) for t in texts]
    for b, a in zip(batch, alone, strict=True):
        np.testing.assert_array_equal(b.wav, a.wav)
