"""The batched engine's vocoder against stock XTTS's, on a separately loaded model.

XttsEngine folds HiFi-GAN's weight norm into plain weights; stock XTTS (and XTTS_ENGINE=stock) keeps the
parametrizations. Demo checkpoints have random weight-norm gains (batching/demo.py), so a fold that mishandled
the gain g would change the audio, and these comparisons see it.
"""

import numpy as np
import torch
from torch.nn.utils import parametrize

from batching import demo
from batching.engine import SamplingParams, Segment
from testing.tolerances import WAVEFORM_TOLERANCE
from testing.voices import synthetic_voice


def _weight_norm_layers(module):
    return [m for m in module.modules() if parametrize.is_parametrized(m, "weight")]


def test_demo_checkpoints_have_weight_norm_gains_that_are_not_the_norms(tiny_stock_engine):
    layers = _weight_norm_layers(tiny_stock_engine.model.hifigan_decoder.waveform_decoder)
    assert len(layers) > 50
    lo, hi = demo.WEIGHT_NORM_GAIN_RANGE
    ratios = []
    for m in layers:
        g, v = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        ratios.append((g / v.flatten(1).norm(dim=1).reshape(g.shape)).flatten())
    ratios = torch.cat(ratios)
    assert lo <= ratios.min() and ratios.max() <= hi
    assert (ratios - 1).abs().mean() > 0.2  # uniform on [0.5, 1.5]: mean |r - 1| is 0.25


def test_the_engine_folds_the_weight_norm_and_keeps_the_weights(tiny_engine, tiny_stock_engine):
    ours = tiny_engine.model.hifigan_decoder.waveform_decoder
    stock = tiny_stock_engine.model.hifigan_decoder.waveform_decoder
    assert not _weight_norm_layers(ours)
    folded = dict(ours.named_modules())
    for name, m in stock.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            torch.testing.assert_close(folded[name].weight, m.weight, rtol=1e-6, atol=1e-7, msg=name)


def test_batched_engine_equals_xtts_engine_stock_on_waveforms(tiny_engine, tiny_stock_engine):
    """Same rows through XTTS_ENGINE=batched and XTTS_ENGINE=stock (greedy, so the codes must be the same too)."""
    voices = [tiny_engine.condition(synthetic_voice(3.0, f0=f0, seed=i), 22050) for i, f0 in enumerate((120, 190))]
    rows = [("Curta.", "pt", 1.0), ("Uma frase média, maior.", "pt", 1.0), ("Faster, please.", "en", 1.3)]
    segments = [Segment(tiny_engine.tokenize(t, lang), len(t), voices[i % 2], SamplingParams(do_sample=False, speed=s))
                for i, (t, lang, s) in enumerate(rows)]  # fmt: skip
    batched = tiny_engine.generate(segments)
    stock = tiny_stock_engine.generate(segments)
    for i, (a, b) in enumerate(zip(batched, stock, strict=True)):
        np.testing.assert_array_equal(a.codes, b.codes, err_msg=f"row {i}")
        assert a.wav.shape == b.wav.shape, f"row {i}"
        assert np.isfinite(a.wav).all() and np.sqrt(np.mean(a.wav**2)) > 1e-3  # real audio, not silence
        diff = float(np.abs(a.wav - b.wav).max())
        assert diff < WAVEFORM_TOLERANCE, f"row {i}: waveforms differ by {diff:.2e}"
