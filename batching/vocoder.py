"""Incremental vocoding: a row's audio span by span, as its latents arrive, equal to vocoding the whole row.

XTTS's vocoder (coqui's `HifiDecoder`) turns a row's latents [T, 1024] into audio in two parts:

1. Linear interpolations (`F.interpolate`, mode "linear"): the `speed` stretch (the engine's, by 1/speed), x4 to
   the vocoder's frame rate (1024/256), x24000/22050 to the output rate. Each output frame reads two neighbouring
   inputs, at coordinates PyTorch computes as float32(float64(1/scale) * (j + 0.5) - 0.5). `_lerp` reproduces
   them bit for bit (it is tested against `F.interpolate`), so any range of frames can be computed from a range
   of latents. Quirk kept: a stage whose output is as long as its input is a copy, not an interpolation.
2. HiFi-GAN, a stack of convolutions: each frame gives `hop` (256) samples, and a sample depends on the frames
   within `receptive_field_frames` (14 for XTTS-v2's vocoder; 12.7 measured) on each side. Run on frames
   [start - margin, end + margin), the samples of [start, end) are those of the whole-row call. At the row's
   start, and at its end once the row is finished, the network's zero padding is the same as in the whole-row
   call, so no margin is needed there.

So a row vocoded in spans gives the same audio as one call on the whole row (to float rounding), at a cost of at
most 2 x margin extra frames per span, and never re-vocodes what it already gave: linear in the row's length.
While a row is still decoding, only frames that no future latent can change are vocoded ("settled": their
interpolation inputs are known and not the row's last, and `margin` settled frames follow them).

Engine thread only (it runs the model).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def receptive_field_frames(generator) -> int:
    """How many input frames on each side of a frame can change its samples in a HiFi-GAN generator (coqui's
    `HifiganGenerator`), rounded up: conv_pre, each upsampling stage (transposed conv, then residual blocks of
    dilated convolutions, at that stage's rate), conv_post. XTTS-v2's vocoder: 14 (measured reach: 12.7)."""
    reach = 0.0  # in input frames
    rate = 1  # output samples per input frame at the current stage

    def conv(c) -> float:
        k, d = c.kernel_size[0], c.dilation[0]
        return (k - 1) * d / 2

    reach += conv(generator.conv_pre)
    for i, up in enumerate(generator.ups):
        stride, k = up.stride[0], up.kernel_size[0]
        rate *= stride
        reach += (k - 1) / 2 / rate  # a transposed conv's output reads inputs within (k - 1) / 2 of its samples
        blocks = generator.resblocks[i * generator.num_kernels : (i + 1) * generator.num_kernels]
        reach += max(sum(conv(c) for c in block.modules() if isinstance(c, torch.nn.Conv1d)) for block in blocks) / rate
    reach += conv(generator.conv_post) / rate
    return math.ceil(reach)


def _coords(scale: float, j0: int, j1: int, in_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input indices (left, right) and weights of the right one for output frames [j0, j1) of a linear
    interpolation by `scale` (align_corners=False) of an input `in_len` frames long, as PyTorch computes them."""
    inv = float(np.float32(1.0 / scale))
    j = torch.arange(j0, j1, dtype=torch.float64)
    real = (inv * (j + 0.5) - 0.5).float().clamp_(min=0)
    left = real.floor().long().clamp_(max=in_len - 1)
    lam = (real - left.float()).clamp_(0, 1)
    right = left + (left < in_len - 1).long()
    return left, right, lam


def _lerp(x: torch.Tensor, offset: int, in_len: int, scale: float, j0: int, j1: int) -> torch.Tensor:
    """Output frames [j0, j1) of `F.interpolate(full, scale_factor=scale, mode="linear")`, where `x` [C, n] holds
    the input frames [offset, offset + n) of `full` and `in_len` is full's length."""
    left, right, lam = _coords(scale, j0, j1, in_len)
    lam = lam.to(x.device)
    return x[:, (left - offset).to(x.device)] * (1 - lam) + x[:, (right - offset).to(x.device)] * lam


def _out_len(in_len: int, scale: float) -> int:
    return math.floor(float(in_len) * scale)  # as F.interpolate sizes its output


class RowVocoder:
    """One row's vocoding state: how much of its audio was given, and the work spent (frames vocoded)."""

    def __init__(self, decoder, speaker: torch.Tensor, speed: float, *, margin: int | None = None):
        self.decoder = decoder  # coqui HifiDecoder
        self.generator = decoder.waveform_decoder
        self.speaker = speaker
        self.stretch = 1.0 / max(speed, 0.05)  # the engine's speed stretch (batching.engine)
        self.hop = int(decoder.output_hop_length)
        self.margin = receptive_field_frames(self.generator) if margin is None else margin
        self.rate = decoder.ar_mel_length_compression / decoder.output_hop_length
        self.resample = decoder.output_sample_rate / decoder.input_sample_rate
        self.emitted = 0  # frames whose samples were given
        self.vocoded = 0  # frames the network ran on, margins included (work)

    # ---------------------------------------------------------------- the interpolation stages

    def _scales(self, n_latents: int) -> list[float]:
        scales = []
        if self.stretch != 1.0 and math.floor(n_latents * self.stretch) >= 1:  # as the engine decides
            scales.append(self.stretch)
        scales.append(self.rate)
        if self.resample != 1.0:
            scales.append(self.resample)
        return scales

    @staticmethod
    def _stage_lengths(n: int, scales: list[float]) -> list[int]:
        lengths = [n]
        for s in scales:
            lengths.append(_out_len(lengths[-1], s))
        return lengths

    def total_frames(self, n_latents: int) -> int:
        """Frames of the finished row (its samples: x hop), as the whole-row call gives them."""
        return self._stage_lengths(n_latents, self._scales(n_latents))[-1]

    def settled_frames(self, n_latents: int) -> int:
        """Frames of a row still decoding, with `n_latents` known, that no later latent can change."""
        scales = self._scales(n_latents)
        known = n_latents
        for s in scales:
            if s > 1 and known * (s - 1) < 1:
                return 0  # the final stage could still be a copy (see module docstring): wait
            n = _out_len(known, s)
            if n == 0:
                return 0
            left, _, _ = _coords(s, 0, n, known)
            # settled: both inputs known, and the right one is not the last known (it may not stay the last)
            known = int(torch.searchsorted(left, known - 1).item())
        return known

    def ready(self, n_latents: int, final: bool) -> int:
        """Frames that can be given now, beyond those already given."""
        end = self.total_frames(n_latents) if final else self.settled_frames(n_latents) - self.margin
        return max(0, end - self.emitted)

    # ---------------------------------------------------------------- vocoding

    @torch.inference_mode()
    def next_span(self, latents: torch.Tensor, final: bool, max_frames: int | None = None) -> np.ndarray:
        """The next samples of the row: up to `max_frames` frames of those ready (all when None; a final span
        always runs to the row's end, so `max_frames` bounds only spans of rows still decoding or long tails).
        `latents` [T, width]: every latent of the row so far. Returns float32 samples (possibly none)."""
        n_latents = int(latents.shape[0])
        scales = self._scales(n_latents)
        lengths = self._stage_lengths(n_latents, scales)
        total = lengths[-1] if final else None
        available = total if final else self.settled_frames(n_latents)
        end = available if final else available - self.margin
        if max_frames is not None:
            end = min(end, self.emitted + max_frames)
        start = self.emitted
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        w0 = max(0, start - self.margin)
        w1 = end if final and end == total else min(available, end + self.margin)
        z = self._frames(latents, scales, lengths, final, w0, w1)
        wav = self.generator(z[None], g=self.speaker.to(z.device))[0, 0]
        self.vocoded += w1 - w0
        self.emitted = end
        out = wav[(start - w0) * self.hop : (end - w0) * self.hop]
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def done(self, n_latents: int) -> bool:
        return self.emitted >= self.total_frames(n_latents)

    def _frames(self, latents, scales, lengths, final, f0: int, f1: int) -> torch.Tensor:
        """Frames [f0, f1) of the last interpolation stage, [C, f1 - f0], from the latents they need."""
        # Backwards: the input range each stage needs.
        ranges = [(f0, f1)]
        for k in range(len(scales) - 1, -1, -1):
            a, b = ranges[0]
            in_len = lengths[k]  # known inputs: settled outputs of a row still decoding never reach the clamp
            if _out_len(in_len, scales[k]) == in_len:  # PyTorch copies when the size does not change
                ranges.insert(0, (a, b))
                continue
            left, right, _ = _coords(scales[k], a, b, in_len)
            ranges.insert(0, (int(left[0]), int(right[-1]) + 1))
        # Forwards.
        a, b = ranges[0]
        x = latents[a:b].T.float()  # [width, n]
        offset = a
        for k, s in enumerate(scales):
            oa, ob = ranges[k + 1]
            if _out_len(lengths[k], s) == lengths[k]:
                x = x[:, oa - offset : ob - offset]
            else:
                x = _lerp(x, offset, lengths[k], s, oa, ob)
            offset = oa
        return x
