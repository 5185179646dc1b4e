"""The workload generator: deterministic, Zipf-skewed voices, realistic text lengths, a language mix."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from bench.workload import (
    LANGUAGES,
    PROFILES,
    REPLIES,
    SENTENCES,
    WorkloadSpec,
    describe,
    make_jobs,
    parse_language_mix,
    poisson_arrivals,
    zipf_weights,
)


def test_same_seed_same_jobs_and_other_seeds_or_streams_differ():
    spec = WorkloadSpec(seed=7)
    assert make_jobs(spec, 200, "closed-c4") == make_jobs(WorkloadSpec(seed=7), 200, "closed-c4")
    assert make_jobs(spec, 200, "closed-c4") != make_jobs(WorkloadSpec(seed=8), 200, "closed-c4")
    assert make_jobs(spec, 200, "closed-c4") != make_jobs(spec, 200, "closed-c16")
    # A shorter run offers a prefix of the longer one's jobs.
    assert make_jobs(spec, 50, "x") == make_jobs(spec, 200, "x")[:50]


def test_seeding_is_stable_across_processes():
    # random.seed(str) hashes with SHA-512, not Python's randomised hash(): pin one draw so a change shows.
    import subprocess
    import sys
    from pathlib import Path

    code = "from bench.workload import *; j = make_jobs(WorkloadSpec(seed=3), 5, 's'); print([x.seed for x in j])"
    repo = Path(__file__).resolve().parents[2]
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo,
                           env={"PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}  # fmt: skip
    assert len(runs) == 1


def test_zipf_weights_and_the_voice_skew():
    w = zipf_weights(8, 1.1)
    assert abs(sum(w) - 1) < 1e-12 and all(a > b for a, b in zip(w, w[1:], strict=False))
    assert zipf_weights(5, 0) == pytest.approx([0.2] * 5)

    jobs = make_jobs(WorkloadSpec(voices=8, zipf_s=1.1), 4000, "skew")
    counts = Counter(j.voice for j in jobs)
    assert set(counts) == set(range(8))  # the long tail is there
    for voice, weight in enumerate(w):
        assert counts[voice] / 4000 == pytest.approx(weight, abs=0.025)
    # a few hot voices take most jobs: the top 2 of 8 take more than half
    assert (counts[0] + counts[1]) / 4000 > 0.5

    uniform = Counter(j.voice for j in make_jobs(WorkloadSpec(voices=4, zipf_s=0), 4000, "u"))
    assert max(uniform.values()) / min(uniform.values()) < 1.2


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_length_classes_follow_the_profile(profile):
    jobs = make_jobs(WorkloadSpec(profile=profile, max_chars=400), 3000, "len")
    classes = Counter(j.length_class for j in jobs)
    for name, weight in PROFILES[profile].items():
        assert classes[name] / 3000 == pytest.approx(weight, abs=0.03)


def test_text_lengths_short_replies_to_paragraphs():
    jobs = make_jobs(WorkloadSpec(profile="mixed", max_chars=300), 2000, "len")
    by_class = {c: [j for j in jobs if j.length_class == c] for c in ("reply", "sentence", "paragraph")}
    assert all(j.chars <= 45 and j.text in REPLIES[j.language] for j in by_class["reply"])
    assert all(j.text in SENTENCES[j.language] for j in by_class["sentence"])
    assert all(40 <= j.chars <= 110 for j in by_class["sentence"])
    paragraphs = by_class["paragraph"]
    assert all(j.chars <= 300 for j in paragraphs)
    assert statistics.median(j.chars for j in paragraphs) > 120
    # Replies are shorter than sentences, sentences shorter than paragraphs.
    medians = [statistics.median(j.chars for j in by_class[c]) for c in ("reply", "sentence", "paragraph")]
    assert medians == sorted(medians)


def test_the_paragraphs_profile_fills_each_paragraph_up_to_max_chars():
    for language in LANGUAGES:
        spec = WorkloadSpec(profile="paragraphs", max_chars=400, languages=((language, 1.0),))
        jobs = make_jobs(spec, 200, "fill")
        longest = max(len(t) for t in SENTENCES[language])
        assert all(400 - longest - 1 <= j.chars <= 400 for j in jobs), (language, min(j.chars for j in jobs))
    assert describe(make_jobs(WorkloadSpec(profile="paragraphs", max_chars=400), 500, "d"))["chars_mean"] > 360


def test_max_chars_caps_every_text_and_the_default_profile_is_short():
    jobs = make_jobs(WorkloadSpec(max_chars=60, profile="long"), 500, "cap")
    assert max(j.chars for j in jobs) <= 60
    default = describe(make_jobs(WorkloadSpec(), 1000, "d"))
    assert 20 <= default["chars_mean"] <= 50  # weighted toward short replies: a CPU run stays affordable
    assert default["length_classes"]["reply"] > 600


def test_language_mix():
    jobs = make_jobs(WorkloadSpec(languages=parse_language_mix("pt:3,en:1")), 4000, "lang")
    langs = Counter(j.language for j in jobs)
    assert set(langs) == {"pt", "en"}
    assert langs["pt"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert parse_language_mix("pt:0.5, en ,es:2") == (("pt", 0.5), ("en", 1.0), ("es", 2.0))
    with pytest.raises(ValueError, match="no texts for language"):
        WorkloadSpec(languages=(("xx", 1.0),))
    with pytest.raises(ValueError):
        parse_language_mix("pt:abc")


@pytest.mark.parametrize("kwargs", [{"voices": 0}, {"zipf_s": -1}, {"profile": "huge"}, {"max_chars": 5},
                                    {"languages": ()}, {"languages": (("pt", 0.0),)}])
def test_bad_workload_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        WorkloadSpec(**kwargs)


def test_job_input_is_the_seed_payload():
    job = make_jobs(WorkloadSpec(), 1, "p")[0]
    payload = job.to_input("gs://bench/voices/voice-{voice:03d}.wav")
    assert payload["gen_text"] == job.text and payload["language"] == job.language
    assert payload["ref_audio_url"] == f"gs://bench/voices/voice-{job.voice:03d}.wav"
    assert payload["voice_id"] == f"bench-voice-{job.voice:03d}"
    assert payload["seed"] == job.seed and isinstance(payload["seed"], int)


def test_poisson_arrivals():
    a = poisson_arrivals(5000, 2.0, seed=1)
    assert a == poisson_arrivals(5000, 2.0, seed=1) and a != poisson_arrivals(5000, 2.0, seed=2)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:], strict=False))
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)
    # exponential gaps: the standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(0.5, rel=0.08)
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0, seed=1)
