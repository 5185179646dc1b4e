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


def test_python_m_bench_engine_is_the_engine_benchmark(monkeypatch):
    from bench.__main__ import main

    seen = []
    monkeypatch.setattr(engine_bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["engine", "--size", "tiny"]) == 0
    assert seen == [["--size", "tiny"]]

