"""`python -m bench engine` (bench/engine_bench.py) on the tiny demo checkpoint: every path, the same audio, the ABBA
order, a report; and `python -m bench engine` reaches it."""

import json

import pytest

from bench import engine_bench

pytestmark = pytest.mark.slow


def test_engine_bench_runs_every_path_on_the_same_audio(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_bench, "RESULTS", tmp_path)
    assert engine_bench.main(["--size", "tiny", "--requests", "3", "--voices", "2", "--batch-sizes", "1,2",
                              "--name", "t"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["order"] == "abba"
    seed, b1, b2, vocoder = report["rows"]
    assert seed["path"].startswith("seed") and seed["ratio"] == 1.0
    assert (b1["batch_size"], b2["batch_size"], vocoder["batch_size"]) == (1, 2, None)
    # ABBA: every path ran twice over the same requests, so each made the same audio, twice.
    assert seed["audio_s"] > 0
    for row in (b1, b2, vocoder):
        assert row["audio_s"] == pytest.approx(seed["audio_s"] / (2 if row is vocoder else 1), rel=1e-6)
        assert row["wall_s"] > 0 and row["ratio"] == pytest.approx(row["audio_s_per_s"] / seed["audio_s_per_s"])
    out = capsys.readouterr().out
    assert "| vocoder alone, same segments (a ceiling on this device) | – |" in out and "summed" in out


def test_engine_bench_times_both_kv_caches_in_one_run_on_the_same_audio(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_bench, "RESULTS", tmp_path)
    assert engine_bench.main(["--size", "tiny", "--requests", "2", "--voices", "1", "--batch-sizes", "2",
                              "--kv-caches", "dynamic,static", "--name", "t"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "t.json").read_text())
    seed, dynamic, static, _ = report["rows"]
    assert (dynamic["kv_cache"], static["kv_cache"]) == ("dynamic", "static")
    assert "KV cache: static" in static["path"]
    # Seeded rows give the same audio on either cache, so both made exactly the seed path's seconds.
    assert dynamic["audio_s"] == pytest.approx(seed["audio_s"], rel=1e-6) == static["audio_s"]
    ratio = report["static_over_dynamic"]["2"]
    assert ratio == pytest.approx(static["audio_s_per_s"] / dynamic["audio_s_per_s"])
    assert f"batch 2: {ratio:.3f}x" in capsys.readouterr().out


def test_python_m_bench_engine_is_the_engine_benchmark(monkeypatch):
    from bench.__main__ import main

    seen = []
    monkeypatch.setattr(engine_bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["engine", "--size", "tiny"]) == 0
    assert seen == [["--size", "tiny"]]

