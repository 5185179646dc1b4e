"""GPU run kit: measures the engine on a lent GPU in one process, within a time budget, and writes a report.

    python -m bench.gpu --out DIR [--device cuda|cpu] [--size full|small|tiny] [--budget-s 420]

`scripts/gpu-check.sh OUT_DIR` runs it on the GPU machine (after installing the carried wheels). Sections, in the
order they run:

1. equivalence: float32 greedy codes of the batched engine (one left-padded batch of different texts) against
   stock `Xtts.inference`, one text at a time, on a model loaded as coqui loads it (the seed's path); the
   waveforms' largest difference (TF32 off for this section);
2-4. the stack (bench/gpu_stack.py): first_audio (Scheduler.stream at c1), load (bursts and open-loop loads at
   c32 and c64, continuous then static, 1 in 6 streamed), step (ms per decoding step at 1-64 rows). The load
   points leave STACK_LEAVES_S of the budget to the sections after them;
5. throughput: the seed's path (conditioning from the file + stock `Xtts.inference`, one request at a time) and the
   batched engine (cached latents, the engine's default precision) at each batch size, in ABBA order, reusing
   bench/engine_bench.py's paths: audio-seconds per second, the ratio to the seed, the vocoder's share, the peak GPU
   memory of each point. Static batches: continuous batching has not landed. It leaves LATER_SECTIONS_S seconds
   of the budget to the next two;
6. vocoder: batched HiFi-GAN (one padded call) against one row at a time, on the same decoded latents;
7. half_precision: the engine's GPT under fp16 / bf16 autocast against float32: share of identical greedy codes,
   waveform difference, and speed of a sampled batch (ABBA);
8. recommendation: MAX_BATCH_SIZE and XTTS_VOCODER_BATCHING for this card, by the rules stated in the report.

The report (gpu-report.json, gpu-report.md) is rewritten after every section, so a killed run leaves what it had.
When the budget runs short, the remaining measurements are skipped and named as such, and the report is written.
A section that fails records its error and the next one runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import engine_bench, gpu_stack
from testing.stock_reference import stock_inference

KIT_VERSION = 1
SECTIONS = ("equivalence", "first_audio", "load", "step", "throughput", "vocoder", "half_precision", "recommendation")
# Seconds the throughput section leaves for the sections after it (they are short; throughput takes the rest).
LATER_SECTIONS_S = 60.0
# Seconds the load points leave for the step section and the engine sections after it.
STACK_LEAVES_S = 150.0
# Rules of the recommendation, stated in the report.
THROUGHPUT_SHARE = 0.90  # the smallest batch reaching this share of the best measured throughput ...
MEMORY_MARGIN = 2.0  # ... whose memory above the loaded model, times this, still fits the card
VOCODER_GAIN = 0.95  # batched vocoding is recommended when it takes at most this share of per-row time
# Texts of bench/engine_bench.py short enough for a quick CPU dry run (--short).
SHORT_CHARS = 40


class Budget:
    """The run's deadline: every measurement asks before it starts, and skips itself when time is short."""

    def __init__(self, seconds: float, reserve_s: float):
        self.started = time.perf_counter()
        self.seconds = seconds
        self.reserve_s = reserve_s  # kept for writing the report and exiting

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.reserve_s - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


class Skipped(Exception):
    """A measurement that did not run (or was abandoned) for want of time."""


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 1048576, 1)


@contextlib.contextmanager
def _engine_settings(engine, *, gpt_dtype="keep", vocoder_batched=None):
    saved = engine.gpt_dtype, engine.vocoder_batched
    if gpt_dtype != "keep":
        engine.gpt_dtype = gpt_dtype
    if vocoder_batched is not None:
        engine.vocoder_batched = vocoder_batched
    try:
        yield engine
    finally:
        engine.gpt_dtype, engine.vocoder_batched = saved


@contextlib.contextmanager
def _no_tf32():
    """Full float32 matmuls and convolutions (TF32 off), for the equivalence check only."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _soundfile_reference_loader():
    """coqui's `load_audio` reads references with torchaudio.load, which in torchaudio 2.9+ needs torchcodec and
    FFmpeg's libraries; the GPU machine has neither. Read them with soundfile instead, with the same steps
    (mono, resample, clip): the seed path's conditioning does the same work on the same samples."""
    import soundfile as sf
    import torch
    import torchaudio
    from TTS.tts.models import xtts as xtts_module

    def load_audio(path, sampling_rate):
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        audio = torch.from_numpy(np.ascontiguousarray(data.T))
        if audio.size(0) != 1:
            audio = torch.mean(audio, dim=0, keepdim=True)
        if sr != sampling_rate:
            audio = torchaudio.functional.resample(audio, sr, sampling_rate)
        return audio.clip_(-1, 1)

    original = xtts_module.load_audio
    xtts_module.load_audio = load_audio
    try:
        yield
    finally:
        xtts_module.load_audio = original


def make_requests(n: int, voices: int, seed: int, short: bool) -> list:
    """bench/engine_bench.py's request mix (its texts, its rule), optionally only its short texts."""
    if not short:
        return engine_bench.make_requests(n, voices, seed)
    texts = [t for t in engine_bench.TEXTS if len(t[0]) <= SHORT_CHARS]
    rng = random.Random(seed)
    return [engine_bench.Request(*rng.choice(texts), voice=i % voices, seed=rng.randrange(1 << 31)) for i in range(n)]


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    if n == 0:
        return float("nan")
    ref = float(np.sqrt(np.mean(b[:n].astype(np.float64) ** 2))) or 1.0
    return float(np.sqrt(np.mean((a[:n].astype(np.float64) - b[:n]) ** 2))) / ref


# ---------------------------------------------------------------- sections


def equivalence(ctx) -> dict:
    """Float32 greedy: the engine's codes, as one batch, against stock Xtts.inference one text at a time."""
    from batching.engine import SamplingParams, Segment

    engine, stock = ctx.engine, ctx.stock
    texts = [(t, lang) for t, lang in engine_bench.TEXTS][: ctx.args.equivalence_texts]
    if ctx.args.short:
        texts = [(t, lang) for t, lang in engine_bench.TEXTS if len(t) <= SHORT_CHARS][: ctx.args.equivalence_texts]
    voice = ctx.latents[0]
    greedy = SamplingParams(do_sample=False, repetition_penalty=5.0)
    rows = []
    with _no_tf32(), _engine_settings(engine, gpt_dtype=None):
        segments = [Segment(engine.tokenize(t, lang), len(t), voice, greedy) for t, lang in texts]
        ours = engine.generate(segments)
        for (text, lang), row in zip(texts, ours, strict=True):
            codes, wav = stock_inference(stock, text, lang, voice, do_sample=False, repetition_penalty=5.0,
                                         temperature=0.75, top_k=50, top_p=0.85)  # fmt: skip
            same_codes = row.codes.shape == codes.shape and bool((row.codes == codes).all())
            n = min(len(row.codes), len(codes))
            diverge = next((i for i in range(n) if row.codes[i] != codes[i]), None)
            if diverge is None and len(row.codes) != len(codes):
                diverge = n
            rows.append({
                "text": text, "language": lang, "tokens": len(codes), "codes_identical": same_codes,
                "first_divergence": diverge, "samples": [len(row.wav), len(wav)],
                "max_abs_wave_diff": float(np.abs(row.wav[: len(wav)] - wav[: len(row.wav)]).max()),
            })  # fmt: skip
    return {
        "status": "ok",
        "what": "float32 greedy (repetition penalty 5.0), TF32 off: the engine decodes all texts as ONE "
        "left-padded batch; stock Xtts.inference decodes each alone on a model loaded as coqui loads it "
        "(HiFi-GAN weight norm kept; the engine folds it)",
        "codes_identical": all(r["codes_identical"] for r in rows),
        "max_abs_wave_diff": max(r["max_abs_wave_diff"] for r in rows),
        "rows": rows,
    }


def _half_dtypes(device) -> list[str]:
    return ["float16", "bfloat16"] if device.type == "cuda" else ["bfloat16"]


def _timed_generate(engine, segments, device) -> tuple[float, float, float]:
    """(audio seconds, wall seconds, vocoder seconds) of one engine.generate call."""
    _sync(device)
    started = time.perf_counter()
    out = engine.generate(segments)
    _sync(device)
    wall = time.perf_counter() - started
    return sum(len(a.wav) for a in out) / engine.sample_rate, wall, engine.last_vocoder_s or 0.0


def half_precision(ctx) -> dict:
    import torch

    from batching.engine import SamplingParams

    engine, budget, device = ctx.engine, ctx.budget, ctx.device
    n = ctx.args.half_rows
    requests = make_requests(n, len(ctx.latents), ctx.args.seed + 1, ctx.args.short)
    greedy = SamplingParams(do_sample=False, repetition_penalty=5.0)
    sampled = SamplingParams(temperature=0.7, top_k=50, top_p=0.85, repetition_penalty=5.0)
    g_segments = engine_bench._segments(engine, requests, ctx.latents, greedy)
    s_segments = engine_bench._segments(engine, requests, ctx.latents, sampled)
    with _engine_settings(engine, gpt_dtype=None):
        reference = engine.generate(g_segments)
        _timed_generate(engine, s_segments, device)  # warm-up of this batch shape
    result = {
        "status": "ok",
        "what": f"{len(g_segments)} segments as one batch. Codes: greedy decoding under autocast against float32 "
        "(position by position). Waveform: RMS of the difference over RMS of the float32 waveform. Speed: a "
        "sampled batch, float32 and the half type alternately (A B B A), summed",
        "rows": len(g_segments),
        "dtypes": {},
    }
    for name in _half_dtypes(device):
        dtype = getattr(torch, name)
        if not budget.allows(ctx.estimate("half", 30.0)):
            result["dtypes"][name] = {"skipped": "time budget"}
            continue
        started = time.perf_counter()
        with _engine_settings(engine, gpt_dtype=dtype):
            half = engine.generate(g_segments)
        total = same = rows_same = 0
        first_div = []
        wave_all, wave_same = [], []
        for a, b in zip(half, reference, strict=True):
            m = min(len(a.codes), len(b.codes))
            eq = a.codes[:m] == b.codes[:m]
            total += max(len(a.codes), len(b.codes))
            same += int(eq.sum())
            identical = len(a.codes) == len(b.codes) and bool(eq.all())
            rows_same += identical
            first_div.append(m if eq.all() else int(np.argmin(eq)))
            wave_all.append(_rel_rms(a.wav, b.wav))
            if identical:
                wave_same.append(_rel_rms(a.wav, b.wav))
        # Speed, ABBA: float32, half, half, float32.
        times = {"float32": [0.0, 0.0], name: [0.0, 0.0]}
        for mode in ("float32", name, name, "float32"):
            with _engine_settings(engine, gpt_dtype=None if mode == "float32" else dtype):
                audio, wall, _ = _timed_generate(engine, s_segments, device)
            times[mode][0] += audio
            times[mode][1] += wall
        fp32_rate = times["float32"][0] / times["float32"][1]
        half_rate = times[name][0] / times[name][1]
        result["dtypes"][name] = {
            "identical_code_share": same / total if total else None,
            "rows_with_identical_codes": rows_same,
            "mean_first_divergence_step": float(np.mean(first_div)),
            "wave_rel_rms_diff_mean": float(np.mean(wave_all)),
            "wave_rel_rms_diff_identical_code_rows": float(np.mean(wave_same)) if wave_same else None,
            "float32_audio_s_per_s": fp32_rate,
            "half_audio_s_per_s": half_rate,
            "speedup": half_rate / fp32_rate,
        }
        ctx.learn("half", time.perf_counter() - started)
    return result


def vocoder(ctx) -> dict:
    """Batched HiFi-GAN against one row at a time, on the same decoded latents, per batch size."""
    import torch

    from batching.engine import SamplingParams

    engine, budget, device = ctx.engine, ctx.budget, ctx.device
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.85, repetition_penalty=5.0)
    points = []
    for b in ctx.args.vocoder_batch_sizes:
        if not budget.allows(ctx.estimate(f"vocoder{b}", ctx.estimate("vocoder", 20.0))):
            points.append({"batch_size": b, "skipped": "time budget"})
            continue
        started = time.perf_counter()
        requests = make_requests(b, len(ctx.latents), ctx.args.seed + 2, ctx.args.short)
        segments = engine_bench._segments(engine, requests, ctx.latents, params)
        with torch.inference_mode():
            _codes, latents = engine._decode(segments)
            speakers = [s.voice.speaker_embedding for s in segments]
            speeds = [s.params.speed for s in segments]
            walls = {"batched": 0.0, "per_row": 0.0}
            wavs = {}
            for mode in ("batched", "per_row", "batched", "per_row", "per_row", "batched"):
                with _engine_settings(engine, vocoder_batched=mode == "batched"):
                    if mode not in wavs:  # warm-up of this shape, untimed
                        engine._vocode(latents, speakers, speeds)
                    _sync(device)
                    t0 = time.perf_counter()
                    wavs[mode] = engine._vocode(latents, speakers, speeds)
                    _sync(device)
                    walls[mode] += time.perf_counter() - t0
        audio_s = sum(len(w) for w in wavs["per_row"]) / engine.sample_rate
        points.append({
            "batch_size": len(segments), "audio_s": audio_s,
            "batched_s": walls["batched"] / 3, "per_row_s": walls["per_row"] / 3,
            "batched_audio_s_per_s": 3 * audio_s / walls["batched"],
            "per_row_audio_s_per_s": 3 * audio_s / walls["per_row"],
            "batched_over_per_row_time": walls["batched"] / walls["per_row"],
            "max_rel_rms_diff": max(_rel_rms(a, b) for a, b in zip(wavs["batched"], wavs["per_row"], strict=True)),
        })  # fmt: skip
        ctx.learn(f"vocoder{b}", time.perf_counter() - started)
        ctx.learn("vocoder", time.perf_counter() - started)
    return {
        "status": "ok" if any("skipped" not in p for p in points) else "skipped",
        **({} if any("skipped" not in p for p in points) else {"skipped": "time budget"}),
        "what": "decode once, then HiFi-GAN on the same latents: one padded batch against one row at a time; "
        "mean of 3 timed runs each (orders B P B P P B) after one warm-up of each",
        "points": points,
    }


def throughput(ctx) -> dict:
    """The seed's path against the batched engine at each batch size, ABBA, within the budget."""
    import torch

    from batching.engine import SamplingParams

    engine, stock, budget, device, args = ctx.engine, ctx.stock, ctx.budget, ctx.device, ctx.args
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.85, repetition_penalty=5.0)
    cuda = device.type == "cuda"
    n_max = max([args.stock_requests] + [max(2 * b, args.min_requests) for b in args.batch_sizes])
    requests = make_requests(n_max, len(ctx.latents), args.seed, args.short)

    def point_requests(kind: str, b: int) -> list:
        return requests[: args.stock_requests] if kind == "seed" else requests[: max(2 * b, args.min_requests)]

    paths = [("seed", 1)] + [("batched", b) for b in args.batch_sizes]
    order = paths + paths[::-1]
    acc = {p: {"audio_s": 0.0, "wall_s": 0.0, "vocoder_s": 0.0, "runs": 0, "peak": 0, "base": None} for p in paths}
    skipped: dict = {}
    # Warm-up, untimed: the first calls load lazy code paths and pick kernels.
    with _soundfile_reference_loader():
        engine_bench.seed_path(stock, requests[:1], ctx.refs, params)
    engine_bench.batched_path(engine, requests[:2], ctx.latents, params, 2)

    for kind, b in order:
        key = (kind, b)
        if key in skipped:
            continue
        chunk = 1 if kind == "seed" else b
        reqs = point_requests(kind, b)
        est = ctx.estimate(f"{kind}{b}", None)
        if est is None:  # first run of this point: guess from the last point that ran
            est = ctx.estimate("last_point", 10.0)
        if not budget.allows(est + LATER_SECTIONS_S):
            skipped[key] = f"time budget ({budget.left():.0f} s left, this point took or was guessed at {est:.0f} s)"
            continue
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        audio = wall = voc = 0.0
        started = time.perf_counter()
        try:
            for i in range(0, len(reqs), chunk):
                if not budget.allows(LATER_SECTIONS_S / 2):
                    raise Skipped("time budget ran out inside this point")
                part = reqs[i : i + chunk]
                _sync(device)
                if kind == "seed":
                    with _soundfile_reference_loader():
                        a, w = engine_bench.seed_path(stock, part, ctx.refs, params)
                else:
                    a, w = engine_bench.batched_path(engine, part, ctx.latents, params, b)
                    voc += engine.last_vocoder_s or 0.0
                _sync(device)
                audio += a
                wall += w
        except Skipped as exc:
            skipped[key] = str(exc)
            continue
        except torch.cuda.OutOfMemoryError as exc:
            skipped[key] = f"CUDA out of memory: {str(exc).splitlines()[0]}"
            continue
        took = time.perf_counter() - started
        ctx.learn(f"{kind}{b}", took)
        ctx.learn("last_point", took)
        a = acc[key]
        a["audio_s"] += audio
        a["wall_s"] += wall
        a["vocoder_s"] += voc
        a["runs"] += 1
        if cuda:
            a["peak"] = max(a["peak"], torch.cuda.max_memory_allocated(device))
            a["base"] = base if a["base"] is None else min(a["base"], base)

    seed = acc[("seed", 1)]
    seed_rate = seed["audio_s"] / seed["wall_s"] if seed["runs"] else None
    rows = []
    for (kind, b), a in acc.items():
        row = {
            "path": "seed (conditioning from the file + stock Xtts.inference, one at a time)" if kind == "seed"
            else "batched engine, cached latents",
            "batch_size": b, "requests": len(point_requests(kind, b)), "runs": a["runs"],
        }  # fmt: skip
        if a["runs"] == 0:
            row["skipped"] = skipped.get((kind, b), "not run")
            rows.append(row)
            continue
        rate = a["audio_s"] / a["wall_s"]
        row.update({
            "audio_s": a["audio_s"], "wall_s": a["wall_s"], "audio_s_per_s": rate,
            "ratio_vs_seed": rate / seed_rate if seed_rate else None,
            "vocoder_share": a["vocoder_s"] / a["wall_s"] if kind == "batched" else None,
            "peak_gpu_mem_mib": _mib(a["peak"]) if cuda else None,
            "mem_above_model_mib": _mib(a["peak"] - a["base"]) if cuda else None,
        })  # fmt: skip
        if a["runs"] < 2:
            row["note"] = "ran once (the second, backward-order run was skipped: " + skipped.get((kind, b), "?") + ")"
        rows.append(row)
    done = [r for r in rows if "skipped" not in r]
    return {
        "status": "ok" if done else "skipped",
        **({} if done else {"skipped": "time budget: no point ran"}),
        "what": "each point run forward then backward (ABBA) and summed; whole static batches through engine.generate "
        "(the worker's scheduler is measured by the load section); the engine at its default precision on this device "
        f"({_dtype_name(engine.gpt_dtype)}), vocoder {'batched' if engine.vocoder_batched else 'per row'}; the "
        f"seed path on its own model in float32, over {args.stock_requests} requests; each batched point over "
        f"max(2 x batch, {args.min_requests}) requests of the same mix; peak memory: torch.cuda.max_memory_allocated, "
        "reset before each point (both models are resident: the worker holds one)",
        "seed_audio_s_per_s": seed_rate,
        "rows": rows,
    }


def recommendation(ctx, report: dict) -> dict:
    sections = report["sections"]
    out: dict = {"rules": {
        "MAX_BATCH_SIZE": f"the smallest measured batch size whose throughput reaches {THROUGHPUT_SHARE:.0%} of the "
        f"best measured, among those whose memory above the loaded model, times {MEMORY_MARGIN:g}, plus the "
        "model still fits the card (no memory rule on a CPU)",
        "XTTS_VOCODER_BATCHING": f"batched when one padded HiFi-GAN call takes at most {VOCODER_GAIN:.0%} of the "
        "per-row time at the largest measured vocoder batch, else per_row",
    }}  # fmt: skip
    rows = [r for r in sections.get("throughput", {}).get("rows", [])
            if r.get("path", "").startswith("batched") and "audio_s_per_s" in r]  # fmt: skip
    if rows:
        total = ctx.total_memory
        fits = []
        for r in rows:
            if total is None or r.get("mem_above_model_mib") is None:
                fits.append(r)
            elif r["peak_gpu_mem_mib"] - r["mem_above_model_mib"] + MEMORY_MARGIN * r["mem_above_model_mib"] <= _mib(
                total
            ):
                fits.append(r)
        best = max(r["audio_s_per_s"] for r in fits) if fits else None
        pick = min((r for r in fits if r["audio_s_per_s"] >= THROUGHPUT_SHARE * best), key=lambda r: r["batch_size"],
                   default=None) if fits else None  # fmt: skip
        out["MAX_BATCH_SIZE"] = pick["batch_size"] if pick else None
        largest = max(r["batch_size"] for r in rows)
        best_b = max(fits, key=lambda r: r["audio_s_per_s"])["batch_size"] if fits else None
        out["MAX_BATCH_SIZE_basis"] = (
            f"{pick['audio_s_per_s']:.2f} audio-s/s at batch {pick['batch_size']}, best {best:.2f} at batch {best_b}"
            if pick else "no measured batch fits"
        )
        if best_b == largest:
            out["MAX_BATCH_SIZE_note"] = (f"throughput was still highest at the largest measured batch ({largest}): "
                                          "a larger batch may pay more; measure it")  # fmt: skip
        out["MAX_CONCURRENCY"] = 4 * out["MAX_BATCH_SIZE"] if pick else None  # the worker's 4x rule (server/config)
    else:
        out["MAX_BATCH_SIZE"] = None
        out["MAX_BATCH_SIZE_basis"] = "skipped: no throughput point ran"
    points = [p for p in sections.get("vocoder", {}).get("points", []) if "batched_s" in p]
    if points:
        p = max(points, key=lambda p: p["batch_size"])
        out["XTTS_VOCODER_BATCHING"] = "batched" if p["batched_over_per_row_time"] <= VOCODER_GAIN else "per_row"
        out["XTTS_VOCODER_BATCHING_basis"] = (f"at batch {p['batch_size']}: batched {p['batched_s']:.3f} s, per row "
                                              f"{p['per_row_s']:.3f} s")  # fmt: skip
    else:
        out["XTTS_VOCODER_BATCHING"] = None
        out["XTTS_VOCODER_BATCHING_basis"] = "skipped: the vocoder section did not run"
    half = sections.get("half_precision", {}).get("dtypes", {})
    notes = []
    for name, h in half.items():
        if "speedup" in h:
            notes.append(f"{name}: {h['speedup']:.2f}x float32's speed, "
                         f"{h['identical_code_share']:.1%} of greedy codes identical")  # fmt: skip
    out["XTTS_GPT_DTYPE_evidence"] = "; ".join(notes) or "skipped"
    out["targets"] = gpu_stack.targets(sections)
    out["status"] = "ok" if out["MAX_BATCH_SIZE"] is not None or out["XTTS_VOCODER_BATCHING"] is not None else "skipped"
    if out["status"] == "skipped":
        out["skipped"] = "no measurement to derive it from"
    return out


def _dtype_name(dtype) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- running


class Context:
    def __init__(self, args, budget):
        self.args = args
        self.budget = budget
        self.times: dict[str, float] = {}
        self.engine = self.stock = self.device = self.latents = self.refs = None
        self.total_memory = None
        self.report: dict | None = None  # rewritten by checkpoint() inside a long section

    def checkpoint(self) -> None:
        if self.report is not None:
            self.report["elapsed_s"] = self.budget.elapsed()
            write_report(self.args.out, self.report)

    def learn(self, key: str, seconds: float) -> None:
        self.times[key] = seconds

    def estimate(self, key: str, default):
        return self.times.get(key, default)


def environment(device) -> dict:
    import torch

    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "total_memory_mib": _mib(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda"
        else None,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }  # fmt: skip
    for dist in ("transformers", "coqui-tts", "tokenizers", "torchaudio", "numpy"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            env[dist] = None
    return env


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu-report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    tmp.replace(out / "gpu-report.json")
    (out / "gpu-report.md").write_text(markdown(report) + "\n")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


def run(args) -> dict:
    budget = Budget(args.budget_s, reserve_s=args.reserve_s)
    ctx = Context(args, budget)
    report: dict = {
        "kit_version": KIT_VERSION,
        "command": "python -m bench.gpu " + " ".join(args.argv),
        "model": f"demo {args.size} (random weights)" if not args.model_dir else args.model_dir,
        "budget_s": args.budget_s,
        "demo_tokens_per_char": args.demo_tokens_per_char,
        "sections": {name: {"status": "skipped", "skipped": "not reached"} for name in SECTIONS},
    }
    import torch

    from batching.engine import LengthRule, XttsEngine
    from batching.loading import resolve_device
    from batching.stock import StockEngine
    from testing.voices import demo_checkpoint

    ctx.device = resolve_device(args.device)
    report["environment"] = environment(ctx.device)
    if ctx.device.type == "cuda":
        ctx.total_memory = torch.cuda.get_device_properties(ctx.device).total_memory
    write_report(args.out, report)
    started = time.perf_counter()
    model_dir = Path(args.model_dir) if args.model_dir else demo_checkpoint(args.size)
    built = time.perf_counter()
    ctx.engine = XttsEngine.load(model_dir, device=args.device, gpt_dtype=args.gpt_dtype, vocoder=args.vocoder)
    ctx.stock = StockEngine.load(model_dir, device=args.device)
    if args.demo_tokens_per_char is not None:  # fewer tokens per segment: a quick dry run
        if ctx.engine.length_rule is None:
            raise SystemExit("--demo-tokens-per-char works on demo checkpoints only")
        ctx.engine.length_rule = ctx.stock.length_rule = LengthRule(args.demo_tokens_per_char)
    report["setup"] = {
        "checkpoint_s": built - started,
        "load_s": time.perf_counter() - built,
        "engine_gpt_dtype": _dtype_name(ctx.engine.gpt_dtype),
        "engine_vocoder": "batched" if ctx.engine.vocoder_batched else "per_row",
        "model_mem_mib": _mib(torch.cuda.memory_allocated(ctx.device)) if ctx.device.type == "cuda" else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        import soundfile as sf

        ctx.refs = engine_bench.write_voices(Path(tmp), args.voices, args.ref_seconds)
        t0 = time.perf_counter()
        ctx.latents = [ctx.engine.condition(sf.read(p, dtype="float32")[0], 22050) for p in ctx.refs]
        report["setup"]["conditioning_s_per_voice"] = (time.perf_counter() - t0) / len(ctx.refs)
        write_report(args.out, report)

        estimates = {"equivalence": 30.0, "first_audio": 15.0, "load": 30.0 + STACK_LEAVES_S, "step": 10.0,
                     "throughput": 60.0 + LATER_SECTIONS_S, "vocoder": 20.0, "half_precision": 30.0}
        sections = {"first_audio": gpu_stack.first_audio, "step": gpu_stack.step,
                    "load": lambda ctx: gpu_stack.load(ctx, leave_s=STACK_LEAVES_S)}
        ctx.report = report
        for name in SECTIONS[:-1]:
            if not budget.allows(ctx.estimate(name, estimates[name])):
                report["sections"][name] = {"status": "skipped", "skipped": f"time budget ({budget.left():.0f} s left)"}
                continue
            t0 = time.perf_counter()
            try:
                report["sections"][name] = sections.get(name, globals().get(name))(ctx)
            except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
                report["sections"][name] = {
                    "status": "error", "skipped": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=8),
                }  # fmt: skip
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
            report["sections"][name]["section_s"] = time.perf_counter() - t0
            report["elapsed_s"] = budget.elapsed()
            write_report(args.out, report)
    report["sections"]["recommendation"] = recommendation(ctx, report)
    report["elapsed_s"] = budget.elapsed()
    write_report(args.out, report)
    return report


# ---------------------------------------------------------------- report


def _f(x, fmt=".2f", none="–") -> str:
    return none if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    s = report["sections"]
    lines = [
        "# GPU run kit report",
        "",
        f"`{report['command']}` — {env.get('date', '?')}; {env.get('device_name', '?')} ({env.get('device', '?')}), "
        f"{_f(env.get('total_memory_mib'), '.0f')} MiB; torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN "
        f"{env.get('cudnn')}, Python {env.get('python')}, transformers {env.get('transformers')}, coqui-tts "
        f"{env.get('coqui-tts')}; model: {report['model']}; budget {report['budget_s']} s, used "
        f"{_f(report.get('elapsed_s'), '.0f', '?')} s.",
        "",
    ]
    setup = report.get("setup")
    if setup:
        lines += [f"Setup: checkpoint {setup['checkpoint_s']:.1f} s, two model loads {setup['load_s']:.1f} s, "
                  f"conditioning {_f(setup.get('conditioning_s_per_voice'), '.3f')} s per voice; engine GPT "
                  f"{setup['engine_gpt_dtype']}, vocoder {setup['engine_vocoder']}; model memory "
                  f"{_f(setup['model_mem_mib'], '.0f')} MiB.", ""]  # fmt: skip

    def skipped(name) -> bool:
        sec = s.get(name, {})
        if sec.get("status") in ("skipped", "error"):
            lines.extend([f"## {name}", "", f"**{sec['status']}**: {sec.get('skipped')}", ""])
            return True
        return False

    if not skipped("equivalence"):
        e = s["equivalence"]
        lines += ["## Equivalence (float32, greedy)", "", e["what"] + ".", "",
                  f"**Codes identical to stock: {e['codes_identical']}**; largest waveform difference "
                  f"{e['max_abs_wave_diff']:.2e}.", "",
                  "| text | lang | tokens | codes identical | first divergence | max abs wave diff |",
                  "|---|---|---:|---|---:|---:|"]  # fmt: skip
        for r in e["rows"]:
            lines.append(f"| {r['text'][:40]} | {r['language']} | {r['tokens']} | {r['codes_identical']} | "
                         f"{_f(r['first_divergence'], 'd')} | {r['max_abs_wave_diff']:.2e} |")  # fmt: skip
        lines.append("")
    lines += gpu_stack.markdown(s, skipped)
    if not skipped("throughput"):
        t = s["throughput"]
        lines += ["## Throughput", "", t["what"] + ".", "",
                  "| path | batch | requests | runs | audio s | wall s | audio-s/s | vs seed | vocoder share | "
                  "peak GPU MiB | above model MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in t["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['path']} | {r['batch_size']} | {r['requests']} | 0 | skipped: {r['skipped']} "
                             "| | | | | | |")  # fmt: skip
                continue
            lines.append(f"| {r['path']} | {r['batch_size']} | {r['requests']} | {r['runs']} | {r['audio_s']:.1f} | "
                         f"{r['wall_s']:.1f} | {r['audio_s_per_s']:.2f} | {_f(r['ratio_vs_seed'])}x | "
                         f"{_f(r['vocoder_share'], '.0%')} | {_f(r['peak_gpu_mem_mib'], '.0f')} | "
                         f"{_f(r['mem_above_model_mib'], '.0f')} |")  # fmt: skip
        lines.append("")
    if not skipped("vocoder"):
        v = s["vocoder"]
        lines += ["## Vocoder: batched vs per row", "", v["what"] + ".", "",
                  "| batch | audio s | batched s | per row s | batched/per row time | batched audio-s/s | "
                  "per row audio-s/s | max rel. RMS diff |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for p in v["points"]:
            if "skipped" in p:
                lines.append(f"| {p['batch_size']} | skipped: {p['skipped']} | | | | | | |")
                continue
            lines.append(f"| {p['batch_size']} | {p['audio_s']:.1f} | {p['batched_s']:.3f} | {p['per_row_s']:.3f} | "
                         f"{p['batched_over_per_row_time']:.2f} | {p['batched_audio_s_per_s']:.1f} | "
                         f"{p['per_row_audio_s_per_s']:.1f} | {p['max_rel_rms_diff']:.2e} |")  # fmt: skip
        lines.append("")
    if not skipped("half_precision"):
        h = s["half_precision"]
        lines += ["## Half precision (GPT autocast)", "", h["what"] + ".", "",
                  "| dtype | identical codes | rows identical | mean first divergence | wave rel. RMS diff (all / "
                  "identical-code rows) | fp32 audio-s/s | half audio-s/s | speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, d in h["dtypes"].items():
            if "skipped" in d:
                lines.append(f"| {name} | skipped: {d['skipped']} | | | | | | |")
                continue
            lines.append(f"| {name} | {d['identical_code_share']:.1%} | {d['rows_with_identical_codes']}/{h['rows']} | "
                         f"{d['mean_first_divergence_step']:.1f} | {d['wave_rel_rms_diff_mean']:.3f} / "
                         f"{_f(d['wave_rel_rms_diff_identical_code_rows'], '.4f')} | {d['float32_audio_s_per_s']:.2f} "
                         f"| {d['half_audio_s_per_s']:.2f} | {d['speedup']:.2f}x |")  # fmt: skip
        lines.append("")
    if not skipped("recommendation"):
        r = s["recommendation"]
        lines += ["## Recommendation for this card", "",
                  f"- `MAX_BATCH_SIZE={r['MAX_BATCH_SIZE']}` ({r['MAX_BATCH_SIZE_basis']}); rule: "
                  f"{r['rules']['MAX_BATCH_SIZE']}." + (f" {r['MAX_BATCH_SIZE_note']}." if r.get("MAX_BATCH_SIZE_note")
                                                        else ""),
                  f"- `XTTS_VOCODER_BATCHING={r['XTTS_VOCODER_BATCHING']}` ({r['XTTS_VOCODER_BATCHING_basis']}); rule: "
                  f"{r['rules']['XTTS_VOCODER_BATCHING']}.",
                  f"- GPT precision evidence: {r['XTTS_GPT_DTYPE_evidence']} (a random-weight model: code agreement "
                  "says nothing about speech quality).", ""]  # fmt: skip
        lines += gpu_stack.targets_markdown(r["targets"])
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu-report.json and gpu-report.md")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--size", default="full", choices=["tiny", "small", "full"])
    parser.add_argument("--model-dir", help="a checkpoint folder instead of a demo one")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run, loading included")
    parser.add_argument("--reserve-s", type=float, default=10.0, help="kept back for writing the report")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--vocoder-batch-sizes", default="8,32")
    parser.add_argument("--stock-requests", type=int, default=8, help="requests of the seed path per run")
    parser.add_argument("--min-requests", type=int, default=8, help="fewest requests of a batched point")
    parser.add_argument("--equivalence-texts", type=int, default=4)
    parser.add_argument("--half-rows", type=int, default=16, help="segments of the half-precision batch")
    parser.add_argument("--voices", type=int, default=4)
    parser.add_argument("--ref-seconds", type=float, default=6.0, help="length of each reference voice")
    parser.add_argument("--gpt-dtype", default="auto", help="the engine's precision for throughput (XTTS_GPT_DTYPE)")
    parser.add_argument("--vocoder", default="auto", choices=["auto", "batched", "per_row"])
    parser.add_argument("--short", action="store_true", help=f"only texts of at most {SHORT_CHARS} characters")
    parser.add_argument("--demo-tokens-per-char", type=float,
                        help="a demo model's segment length rule (default: the checkpoint's, 1.4); less: a quicker run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-audio-reps", type=int, default=3, help="repetitions of each first-audio text")
    parser.add_argument("--load-concurrency", default="32,64", help="concurrencies of the load points")
    parser.add_argument("--step-rows", default="1,8,32,64", help="row counts of the decoding-step timings")
    parser.add_argument("--step-history", type=int, default=500, help="audio positions each row holds first")
    parser.add_argument("--step-warmup", type=int, default=3)
    parser.add_argument("--step-steps", type=int, default=30, help="steps timed at each row count")
    ns = parser.parse_args(argv)
    ns.argv = list(argv if argv is not None else sys.argv[1:])
    ns.batch_sizes = [int(b) for b in ns.batch_sizes.split(",") if b]
    ns.vocoder_batch_sizes = [int(b) for b in ns.vocoder_batch_sizes.split(",") if b]
    ns.load_concurrency = [int(c) for c in ns.load_concurrency.split(",") if c]
    ns.step_rows = [int(n) for n in ns.step_rows.split(",") if n]
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(markdown(report))
    print(f"\nwritten {args.out / 'gpu-report.json'} and gpu-report.md")
    eq = report["sections"]["equivalence"]
    return 0 if eq.get("status") != "ok" or eq.get("codes_identical") else 1


if __name__ == "__main__":
    sys.exit(main())
