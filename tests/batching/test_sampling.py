"""Sampling parameters: the engine's per-row sampler against Hugging Face's own logits processors.

`_sample` draws by inverse CDF from one uniform number u per row: token j comes out for u in [P(j-1), P(j)), where
P is the cumulative distribution it samples from. So the sampler's distribution can be checked exactly, without
reaching into it: with Q the cumulative distribution Hugging Face's `TemperatureLogitsWarper`, `TopKLogitsWarper`
and `TopPLogitsWarper` leave (in the order `generate` applies them), u = Q(j-1) + d and u = Q(j) - d must both
give token j, for every token j Hugging Face keeps. That holds only if |P - Q| < d at every token: each
probability within 2d of Hugging Face's, no kept token dropped, no token kept beyond what Hugging Face keeps
(any extra mass over 2d shifts P). All rows go through one call, rows of different parameters side by side.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import batching.sampling as sampling_module
from batching.engine import SamplingParams, Segment

N_AUDIO = 1026  # XTTS's audio vocabulary, start and stop tokens included
# How far inside each token's CDF interval u is put. float32 softmax and cumulative sums differ from Hugging
# Face's by ~1e-7 (measured: < 2e-7); a sampler ignoring any one parameter moves P by more than 1e-2.
CDF_MARGIN = 2e-6


def hf_probs(logits: torch.Tensor, params: list[tuple[float, int, float]]) -> torch.Tensor:
    """Per row: Hugging Face's temperature, top-k, top-p warpers (generate's order), then softmax."""
    out = []
    for row, (temperature, top_k, top_p) in zip(logits, params, strict=True):
        scores = row[None].clone()
        ids = torch.zeros(1, 1, dtype=torch.long)
        for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
            scores = warper(ids, scores)
        out.append(scores.softmax(-1)[0].double())
    return torch.stack(out)


def assert_sampler_draws_from(expected: torch.Tensor, logits, temperature, top_k, top_p, labels, chunk=4096):
    """`_sample` on these rows gives token j for u just inside [Q(j-1), Q(j)), for every j that `expected` keeps."""
    q = expected / expected.sum(-1, keepdim=True)
    cdf = q.cumsum(-1)
    rows, us, want = [], [], []
    for r in range(len(q)):
        kept = torch.nonzero(q[r] > 2 * CDF_MARGIN).flatten()
        hi = cdf[r, kept]
        lo = hi - q[r, kept]
        for u in (lo + CDF_MARGIN, hi - CDF_MARGIN):
            rows.append(torch.full_like(kept, r))
            us.append(u)
            want.append(kept)
    rows, us, want = torch.cat(rows), torch.cat(us), torch.cat(want)
    got = torch.cat([
        sampling_module.sample(logits[rows[i:i + chunk]], temperature[rows[i:i + chunk]], top_k[rows[i:i + chunk]],
                              top_p[rows[i:i + chunk]], us[i:i + chunk])
        for i in range(0, len(rows), chunk)
    ])  # fmt: skip
    bad = torch.nonzero(got != want).flatten()
    if len(bad):
        i = bad[0].item()
        r = rows[i].item()
        raise AssertionError(
            f"{len(bad)} of {len(rows)} draws differ from Hugging Face's distribution; first: row {r} {labels[r]}, "
            f"u={us[i].item():.9f} gave token {got[i].item()} (p_HF={q[r, got[i]].item():.3g}), Hugging Face "
            f"token {want[i].item()} (p_HF={q[r, want[i]].item():.3g})"
        )
    assert len(rows) > 0


def fixed_logits(b: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(b, N_AUDIO, generator=gen)
    logits[-1] = torch.round(logits[-1])  # many exact ties: top-k keeps every token tied with the k-th, as HF does
    return logits


# (temperature, top_k, top_p): the released defaults, then each parameter pushed alone, then mixes.
PARAMS = [
    (0.75, 50, 0.85),
    (1.0, N_AUDIO, 1.0),
    (0.3, N_AUDIO, 1.0),
    (2.5, N_AUDIO, 1.0),
    (1.0, 7, 1.0),
    (1.0, N_AUDIO, 0.3),
    (1.6, 200, 0.95),
    (0.5, 3, 0.99),
    (1.0, 20, 0.5),
]


def test_the_sampler_draws_from_hugging_faces_distribution_row_by_row():
    logits = fixed_logits(len(PARAMS))
    temperature = torch.tensor([p[0] for p in PARAMS])[:, None]
    top_k = torch.tensor([p[1] for p in PARAMS])[:, None]
    top_p = torch.tensor([p[2] for p in PARAMS])[:, None]
    theirs = hf_probs(logits, PARAMS)
    assert_sampler_draws_from(theirs, logits, temperature, top_k, top_p, PARAMS)
    # The parameters really shape these rows: a sampler ignoring any one of them would be caught above.
    support = (theirs > 0).sum(-1).tolist()
    assert support[1] == N_AUDIO and support[4] == 7 and support[5] < 30 and support[7] <= 3
    assert theirs[2].max() > theirs[1].max() > theirs[3].max()  # temperature sharpens and flattens


def test_the_sampler_matches_hugging_face_after_the_repetition_penalty():
    """The penalty is the engine's (in `_decode`); here Hugging Face's processor feeds the sampler, as in stock."""
    logits = fixed_logits(3, seed=1)
    history = torch.tensor([[1, 1024, 5, 9, 5], [1, 1024, 700, 3, 3], [1, 1024, 12, 13, 14]])
    penalised = torch.cat([RepetitionPenaltyLogitsProcessor(pen)(h[None], row[None].clone())
                           for h, row, pen in zip(history, logits, (5.0, 2.0, 1.0), strict=True)])  # fmt: skip
    params = [(0.75, 50, 0.85), (1.2, 100, 0.9), (0.5, 10, 0.7)]
    t, k, p = (torch.tensor([x[i] for x in params])[:, None] for i in range(3))
    assert_sampler_draws_from(hf_probs(penalised, params), penalised, t, k, p, params)


def test_draws_follow_the_distribution_and_one_uniform_gives_one_token():
    """The inverse CDF itself: 20k seeded draws of one row have the implied frequencies."""
    logits = fixed_logits(1, seed=2).repeat(20_000, 1)
    t, k, p = (torch.full((20_000, 1), x) for x in (0.9, 40, 0.9))
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    draws = sampling_module.sample(logits, t, k.long(), p, u)
    freq = torch.bincount(draws, minlength=N_AUDIO).double() / 20_000
    expected = hf_probs(logits[:1], [(0.9, 40, 0.9)])[0]
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
    assert (freq - expected).abs().max() < 0.015  # 4.4 sigma of the worst binomial at 20k draws
    again = sampling_module.sample(logits[:100], t[:100], k[:100].long(), p[:100], u[:100])
    assert torch.equal(again, draws[:100])


# ------------------------------------------------------------------ through the real engine


def _capture_steps(engine, segments, monkeypatch):
    """Run `engine.generate` recording, per decoding step, the raw mel-head logits and what `_sample` was given."""
    raw, calls = [], []
    hook = engine.model.gpt.mel_head.register_forward_hook(lambda _m, _i, out: raw.append(out.detach().float().clone()))
    real_sample = sampling_module.sample

    def spy(logits, temperature, top_k, top_p, u):
        calls.append((logits.clone(), temperature.clone(), top_k.clone(), top_p.clone()))
        return real_sample(logits, temperature, top_k, top_p, u)

    monkeypatch.setattr(sampling_module, "sample", spy)
    try:
        with torch.inference_mode():
            codes, _ = engine._decode(segments)  # decoding only: the vocoder plays no part in sampling
    finally:
        hook.remove()
    return codes, raw, calls


def test_every_decoding_step_is_hugging_faces_processors_on_that_rows_history(tiny_engine, voice_wav, monkeypatch):
    """Four rows of equal length and different parameters: at every step, the engine's penalised logits are
    `RepetitionPenaltyLogitsProcessor` on the row's own history, and the sampler's distribution is the warpers'."""
    voice = tiny_engine.condition(voice_wav, 22050)
    text = "Four rows."  # same length: no row leaves the batch early, so row i of each step is segment i
    params = [
        SamplingParams(temperature=0.75, top_k=50, top_p=0.85, repetition_penalty=5.0, seed=1),
        SamplingParams(temperature=1.5, top_k=100, top_p=0.97, repetition_penalty=1.0, seed=2),
        SamplingParams(temperature=0.4, top_k=8, top_p=1.0, repetition_penalty=2.0, seed=3),
        SamplingParams(temperature=1.0, top_k=60, top_p=0.6, repetition_penalty=1.3, seed=4),
    ]
    segments = [Segment(tiny_engine.tokenize(text, "en"), len(text), voice, p) for p in params]
    out, raw, calls = _capture_steps(tiny_engine, segments, monkeypatch)
    steps = len(out[0])
    assert all(len(o) == steps for o in out) and len(raw) == len(calls) == steps
    penalised, hf = [], []
    for t, (logits, temperature, top_k, top_p) in enumerate(calls):
        assert temperature.flatten().tolist() == pytest.approx([p.temperature for p in params])
        for i, p in enumerate(params):
            history = torch.tensor([[1, tiny_engine.start_audio, *out[i][:t].tolist()]])
            expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(history, raw[t][i : i + 1].clone())[0]
            expected[tiny_engine.stop_audio] = -math.inf  # a demo row ends by length, never by its stop token
            torch.testing.assert_close(logits[i], expected, rtol=0, atol=0)
            hf.append((p.temperature, p.top_k, p.top_p))
        penalised.append(logits)
    stacked = torch.cat(penalised)
    t_all, k_all, p_all = (torch.cat([c[j] for c in calls]) for j in (1, 2, 3))
    assert_sampler_draws_from(hf_probs(stacked, hf), stacked, t_all, k_all, p_all, hf)


def _first_codes(engine, voice, params: SamplingParams, rows: int) -> np.ndarray:
    """The first audio code of `rows` seeded rows of one text: i.i.d. draws from one distribution."""
    text = "Hi."  # the shortest demo segment (4 tokens)
    tokens = engine.tokenize(text, "en")
    segments = [Segment(tokens, len(text), voice, dataclasses.replace(params, seed=1000 + i)) for i in range(rows)]
    codes, _ = engine._decode(segments)  # decoding only: the vocoder is not what this measures
    return np.array([c[0] for c in codes])


def _entropy_bits(codes: np.ndarray) -> float:
    p = np.bincount(codes) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_higher_temperature_and_top_p_give_a_flatter_distribution_in_the_engine(tiny_engine, voice_wav):
    """48 seeded rows' first codes: i.i.d. draws from one step's distribution. The tiny model's logits have a std
    of ~0.6 over 1026 codes, so temperature 1 is already nearly uniform (48 distinct codes out of 48); measured
    entropies of the 48 draws: T=0.1: 0.87 bits, T=0.3: 5.0, T=1: 5.58 (= log2 48); T=0.3 with top_p=0.2: 1.7."""
    voice = tiny_engine.condition(voice_wav, 22050)
    rows = 48
    settings = {
        "cold": SamplingParams(temperature=0.1, top_k=N_AUDIO, top_p=1.0),
        "warm": SamplingParams(temperature=0.3, top_k=N_AUDIO, top_p=1.0),
        "hot": SamplingParams(temperature=1.0, top_k=N_AUDIO, top_p=1.0),
        "narrow": SamplingParams(temperature=0.3, top_k=N_AUDIO, top_p=0.2),
    }
    with torch.inference_mode():
        h = {name: _entropy_bits(_first_codes(tiny_engine, voice, p, rows)) for name, p in settings.items()}
    assert h["cold"] + 2.0 < h["warm"] <= h["hot"], h
    assert h["narrow"] + 2.0 < h["warm"], h  # top-p cuts the tail of the same distribution
