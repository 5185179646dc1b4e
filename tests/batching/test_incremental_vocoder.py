"""batching.vocoder: a row vocoded span by span, as its latents arrive, gives the audio of one call on the whole
row (the engine's `_vocode`, itself checked against stock XTTS), at a cost bounded by the spans' margins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batching.vocoder import RowVocoder, _lerp, receptive_field_frames


@pytest.mark.parametrize("length", [2, 5, 37, 300, 3000])
@pytest.mark.parametrize("scale", [4.0, 24000 / 22050, 1 / 1.3, 1 / 0.7, 1 / 0.99, 1 / 2.0, 1 / 0.5])
def test_lerp_reproduces_torch_interpolate(length, scale):
    """Any range of output frames, computed from a window of the input, equals PyTorch's to float rounding. (With
    float32 coordinates rounded any other way, frames near 3000 are off by ~5e-4.)"""
    n = math.floor(length * scale)
    if n == length:
        pytest.skip("PyTorch copies when the size does not change (RowVocoder handles that case itself)")
    x = torch.randn(8, length, generator=torch.Generator().manual_seed(length))
    ref = F.interpolate(x[None], scale_factor=scale, mode="linear")[0]
    j0, j1 = n // 3, max(n // 3 + 1, 2 * n // 3)
    lo = max(0, math.floor((j0 + 0.5) / scale - 0.5) - 1)
    hi = min(length, math.floor((j1 + 0.5) / scale - 0.5) + 3)
    window = _lerp(x[:, lo:hi], lo, length, scale, j0, j1)
    assert torch.allclose(window, ref[:, j0:j1], rtol=0, atol=1e-6)
    assert torch.allclose(_lerp(x, 0, length, scale, 0, n), ref, rtol=0, atol=1e-6)


def test_the_receptive_field_bounds_what_one_frame_changes(tiny_engine):
    generator = tiny_engine.model.hifigan_decoder.waveform_decoder
    margin = receptive_field_frames(generator)
    hop = int(tiny_engine.model.hifigan_decoder.output_hop_length)
    z = torch.randn(1, generator.conv_pre.in_channels, 120, generator=torch.Generator().manual_seed(0))
    g = torch.randn(1, 512, 1, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        base = generator(z, g=g)[0, 0]
        z[:, :, 60] += 1.0
        changed = torch.nonzero(generator(z, g=g)[0, 0] != base).flatten()
    reach_left = (60 * hop - int(changed.min())) / hop
    reach_right = (int(changed.max()) + 1 - 61 * hop) / hop
    assert max(reach_left, reach_right) <= margin <= max(reach_left, reach_right) + 2, (reach_left, reach_right)


def _latents(engine, n, seed):
    width = engine.model.hifigan_decoder.waveform_decoder.conv_pre.in_channels
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _stream(engine, latents, speaker, speed, every, max_frames):
    """Feed the latents `every` at a time, taking spans of at most `max_frames` as they become ready."""
    vocoder = RowVocoder(engine.model.hifigan_decoder, speaker, speed)
    parts, spans = [], 0
    for n in range(every, len(latents), every):
        while vocoder.ready(n, final=False) > 0:
            parts.append(vocoder.next_span(latents[:n], final=False, max_frames=max_frames))
            spans += 1
    while not vocoder.done(len(latents)):
        parts.append(vocoder.next_span(latents, final=True, max_frames=max_frames))
        spans += 1
    return np.concatenate(parts), vocoder, spans


@pytest.mark.parametrize("speed", [1.0, 1.3, 0.8, 0.99])
@pytest.mark.parametrize(("n", "every", "max_frames"), [(3, 1, None), (40, 1, 30), (130, 7, 60), (130, 13, None)])
def test_spans_join_to_the_whole_row(tiny_engine, speed, n, every, max_frames):
    latents = _latents(tiny_engine, n, seed=n)
    speaker = torch.randn(1, 512, 1, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = tiny_engine._vocode([latents], [speaker], [speed])[0]
        streamed, vocoder, spans = _stream(tiny_engine, latents, speaker, speed, every, max_frames)
    assert len(streamed) == len(whole)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5)
    total = vocoder.total_frames(n)
    assert vocoder.emitted == total
    assert total <= vocoder.vocoded <= total + 2 * vocoder.margin * spans  # no frame vocoded twice but margins


def test_nothing_is_given_that_a_later_latent_could_change(tiny_engine):
    """Spans of a row still decoding stop `margin` settled frames short of the known end; with speed 0.99 the
    stretch may still turn out a plain copy (PyTorch's rule for same-size outputs), so nothing is given early."""
    speaker = torch.randn(1, 512, 1)
    v = RowVocoder(tiny_engine.model.hifigan_decoder, speaker, 1.0)
    assert v.ready(3, final=False) == 0 and v.ready(3, final=True) == v.total_frames(3)
    assert 0 < v.ready(40, final=False) <= v.total_frames(40) - v.margin
    slow = RowVocoder(tiny_engine.model.hifigan_decoder, speaker, 0.99)
    assert slow.ready(98, final=False) == 0 and slow.ready(101, final=False) > 0


def test_a_row_in_long_spans_costs_little_more_than_one_call(tiny_engine):
    """The issue's bound for streaming: frames vocoded <= 1.2x the frames given, with 0.5 s first spans doubling
    to 8 s (the scheduler's defaults), on a 30 s row."""
    latents = _latents(tiny_engine, 646, seed=3)  # ~30 s of audio
    v = RowVocoder(tiny_engine.model.hifigan_decoder, torch.randn(1, 512, 1), 1.0)
    span = 47
    with torch.inference_mode():
        for n in range(1, len(latents)):
            if v.ready(n, final=False) >= span:
                v.next_span(latents[:n], final=False, max_frames=span)
                span = min(2 * span, 750)
        while not v.done(len(latents)):
            v.next_span(latents, final=True, max_frames=span)
    assert v.vocoded <= 1.2 * v.total_frames(len(latents)), (v.vocoded, v.total_frames(len(latents)))
