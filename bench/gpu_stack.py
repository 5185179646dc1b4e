"""The GPU kit's stack sections: the worker's own Scheduler (continuous and static) on the kit's engine, not only
whole engine batches. `python -m bench.gpu` runs them right after the equivalence check, most important first:

- first_audio: time to the first AudioChunk of `Scheduler.stream` at concurrency 1, on a ~250-character
  paragraph (3 repetitions), beside the same request not streamed, and one short sentence both ways;
- load: at each concurrency (32 and 64), a burst (2 x c requests at once) and an open-loop load (Poisson arrivals
  at 90% of the burst's request rate under continuous scheduling, the same arrivals for both), each under
  SCHEDULING=continuous and then static with MAX_BATCH_SIZE=c; the bench's mixed texts, 1 in 6 streamed. Each
  point: audio-s/s, real-time factor, latency p50/p95, the short jobs' p50, the streamed jobs' first-audio
  p50/p95, peak GPU memory;
- step: ms per decoding step at 1, 8, 32 and 64 rows whose histories reach ~500 positions, for every decoding
  path the engine has (the dynamic cache, the static one, and on CUDA the static step as CUDA graphs).

Each returns a section dict for the report (status, what, figures); each asks the budget before every point and
records what it skipped and why.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import numpy as np

from bench import engine_bench
from bench.stats import percentile

PARAGRAPH = (
    "Thanks for calling. Your order left our warehouse this morning and should arrive on Thursday. "
    "If you would like to change the delivery address, press one now, or stay on the line and an agent "
    "will be with you shortly."
)
SHORT_SENTENCE = "Your package has shipped and should arrive on Thursday."
STREAM_EVERY = 6  # 1 in 6 requests of a load point is streamed
SHORT_JOB_CHARS = 60  # a "short job" of the load points
OPEN_LOOP_LOAD = 0.9  # open-loop arrival rate, as a share of the continuous burst's request rate
REPETITIONS = 3


class _Voices:
    """The kit's reference voices as Scheduler requests: each voice's samples read once, its key fixed."""

    def __init__(self, refs):
        import soundfile as sf

        self.samples = [sf.read(str(p), dtype="float32") for p in refs]

    def request(self, text: str, language: str, voice: int, seed: int, *, stream: bool = False):
        from batching.params import SamplingParams
        from batching.scheduler import SpeechRequest

        wav, sr = self.samples[voice % len(self.samples)]

        async def load():
            return wav, sr

        return SpeechRequest(text=text, language=language, voice_key=f"kit-voice-{voice % len(self.samples)}",
                             load_reference=load, params=SamplingParams(seed=seed), request_id=f"kit-{seed}",
                             stream=stream)  # fmt: skip


def _scheduler(engine, scheduling: str, max_batch_size: int):
    from batching.latents import LatentCache
    from batching.scheduler import Scheduler

    return Scheduler(engine, LatentCache(64, None, "gpu-kit"), max_batch_size=max_batch_size, batch_wait_s=0.005,
                     scheduling=scheduling)  # fmt: skip


async def _whole(sched, request) -> dict:
    t0 = time.perf_counter()
    result = await sched.submit(request)
    return {"latency_s": time.perf_counter() - t0, "audio_s": result.duration_s}


async def _streamed(sched, request) -> dict:
    from batching.streaming import AudioChunk

    t0 = time.perf_counter()
    first = None
    chunks = 0
    result = None
    async for item in sched.stream(request):
        if isinstance(item, AudioChunk):
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
        else:
            result = item
    return {"first_audio_s": first, "latency_s": time.perf_counter() - t0, "audio_s": result.duration_s,
            "chunks": chunks}  # fmt: skip


async def _warm(sched, voices: _Voices) -> None:
    """One short request per voice, untimed: the voices' latents are cached and lazy code paths loaded."""
    for v in range(len(voices.samples)):
        await _whole(sched, voices.request("Warm up.", "en", v, 1))


def _p(values, q):
    return percentile([v for v in values if v is not None], q)


# ---------------------------------------------------------------- (a) first audio at c1


def first_audio(ctx) -> dict:
    voices = _Voices(ctx.refs)
    reps = ctx.args.first_audio_reps
    out: dict = {"status": "ok", "repetitions": reps}

    async def run() -> None:
        sched = _scheduler(ctx.engine, "continuous", ctx.args.load_concurrency[-1] if ctx.args.load_concurrency else 8)
        await sched.start()
        try:
            await _warm(sched, voices)
            for name, text, voice in (("paragraph", PARAGRAPH, 0), ("short_sentence", SHORT_SENTENCE, 0)):
                runs = {"streamed": [], "whole": []}
                for rep in range(reps):
                    if not ctx.budget.allows(5.0):
                        runs["skipped"] = f"time budget ({ctx.budget.left():.0f} s left)"
                        break
                    seed = 100 + rep
                    runs["streamed"].append(await _streamed(sched, voices.request(text, "en", voice, seed, stream=True)))
                    runs["whole"].append(await _whole(sched, voices.request(text, "en", voice, seed)))
                out[name] = _first_audio_summary(text, runs)
        finally:
            await sched.close()

    asyncio.run(run())
    paragraph = out.get("paragraph", {})
    if paragraph.get("first_audio_p50_s") is None:
        out.update(status="skipped", skipped="time budget: no repetition ran")
    out["what"] = (
        f"Scheduler.stream at concurrency 1 (SCHEDULING=continuous, StreamSettings' default first chunk), "
        f"{reps} repetitions of each text, each beside the same request (same seed) not streamed; latents cached "
        "(one untimed request per voice first); first audio = the first AudioChunk on the event loop"
    )
    return out


def _first_audio_summary(text: str, runs: dict) -> dict:
    firsts = [r["first_audio_s"] for r in runs["streamed"]]
    wholes = [r["latency_s"] for r in runs["whole"]]
    audio = [r["audio_s"] for r in runs["whole"]]
    summary = {"chars": len(text), "runs": runs}
    if firsts and wholes:
        summary.update({
            "first_audio_p50_s": statistics.median(firsts),
            "whole_latency_p50_s": statistics.median(wholes),
            "streamed_total_p50_s": statistics.median(r["latency_s"] for r in runs["streamed"]),
            "audio_s": statistics.median(audio),
            "first_over_whole": statistics.median(firsts) / statistics.median(wholes),
            "rtf_c1": statistics.median(wholes) / statistics.median(audio),
        })  # fmt: skip
    return summary


# ---------------------------------------------------------------- (b) load at c32 and c64


def load(ctx, *, leave_s: float) -> dict:
    """Every (concurrency, kind, scheduling) point the budget allows, keeping `leave_s` for the later sections."""
    voices = _Voices(ctx.refs)
    points: list[dict] = []
    for c in ctx.args.load_concurrency:
        mix = engine_bench.make_requests(2 * c, len(voices.samples), ctx.args.seed + c)
        rate = None
        for kind in ("burst", "open_loop"):
            arrivals = _arrivals(len(mix), rate, ctx.args.seed + c) if kind == "open_loop" else [0.0] * len(mix)
            for scheduling in ("continuous", "static"):
                point = {"concurrency": c, "kind": kind, "scheduling": scheduling, "requests": len(mix)}
                estimate = ctx.estimate(f"load{c}", ctx.estimate("load_last", 20.0))
                if kind == "open_loop" and rate is None:
                    point["skipped"] = "no continuous burst at this concurrency to set the arrival rate"
                elif not ctx.budget.allows(estimate + leave_s):
                    point["skipped"] = f"time budget ({ctx.budget.left():.0f} s left, point guessed at {estimate:.0f} s)"
                else:
                    t0 = time.perf_counter()
                    point.update(asyncio.run(_load_point(ctx, voices, mix, arrivals, scheduling, c)))
                    ctx.learn(f"load{c}", time.perf_counter() - t0)
                    ctx.learn("load_last", time.perf_counter() - t0)
                    if kind == "burst" and scheduling == "continuous" and point.get("requests_per_s"):
                        rate = OPEN_LOOP_LOAD * point["requests_per_s"]
                    if kind == "open_loop":
                        point["arrival_rate_per_s"] = rate
                points.append(point)
                ctx.checkpoint()
    done = [p for p in points if "skipped" not in p]
    return {
        "status": "ok" if done else "skipped",
        **({} if done else {"skipped": "time budget: no point ran"}),
        "what": f"the Scheduler with MAX_BATCH_SIZE = concurrency, MAX_BATCH_TOKENS automatic, BATCH_WAIT_MS 5; "
        f"2 x concurrency requests of bench/engine_bench.py's mixed texts, 1 in {STREAM_EVERY} streamed; burst: all "
        f"submitted at once; open loop: Poisson arrivals at {OPEN_LOOP_LOAD:.0%} of the continuous burst's request "
        "rate, the same arrival times for both schedulings; latency from each request's own arrival; short jobs: "
        f"texts of at most {SHORT_JOB_CHARS} characters; the engine at the kit's precision; latents cached; peak "
        "memory: torch.cuda.max_memory_allocated, reset before each point",
        "points": points,
        **_continuous_over_static(points),
    }


def _arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    if rate is None:
        return []
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _load_point(ctx, voices: _Voices, mix, arrivals, scheduling: str, c: int) -> dict:
    import torch

    cuda = ctx.device.type == "cuda"
    sched = _scheduler(ctx.engine, scheduling, c)
    await sched.start()
    try:
        await _warm(sched, voices)
        if cuda:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()

        async def one(i, r, at):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            streamed = i % STREAM_EVERY == 0
            request = voices.request(r.text, r.language, r.voice, r.seed, stream=streamed)
            out = await (_streamed(sched, request) if streamed else _whole(sched, request))
            return {**out, "chars": len(r.text), "streamed": streamed}

        results = await asyncio.gather(*(one(i, r, at) for i, (r, at) in enumerate(zip(mix, arrivals))),
                                       return_exceptions=True)  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        await sched.close()
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    audio = sum(r["audio_s"] for r in ok)
    latencies = [r["latency_s"] for r in ok]
    return {
        "wall_s": wall, "audio_s": audio, "audio_s_per_s": audio / wall if wall else None,
        "rtf": wall / audio if audio else None, "requests_per_s": len(ok) / wall if wall else None,
        "latency_p50_s": _p(latencies, 0.5), "latency_p95_s": _p(latencies, 0.95),
        "latency_max_s": max(latencies, default=None),
        "short_p50_s": _p([r["latency_s"] for r in ok if r["chars"] <= SHORT_JOB_CHARS and not r["streamed"]], 0.5),
        "streamed": sum(r["streamed"] for r in ok),
        "stream_first_audio_p50_s": _p([r.get("first_audio_s") for r in ok if r["streamed"]], 0.5),
        "stream_first_audio_p95_s": _p([r.get("first_audio_s") for r in ok if r["streamed"]], 0.95),
        "peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1) if cuda else None,
        "n_errors": len(errors), "errors": errors[:3],
    }  # fmt: skip


def _continuous_over_static(points: list[dict]) -> dict:
    ratios = {}
    for p in points:
        if p["scheduling"] != "continuous" or "skipped" in p:
            continue
        s = next((q for q in points if q["scheduling"] == "static" and "skipped" not in q
                  and (q["concurrency"], q["kind"]) == (p["concurrency"], p["kind"])), None)  # fmt: skip
        if s and s.get("audio_s_per_s") and s.get("latency_p50_s"):
            ratios[f"c{p['concurrency']}_{p['kind']}"] = {
                "throughput": p["audio_s_per_s"] / s["audio_s_per_s"],
                "latency_p50": p["latency_p50_s"] / s["latency_p50_s"],
                "short_p50": p["short_p50_s"] / s["short_p50_s"] if p["short_p50_s"] and s["short_p50_s"] else None,
            }
    return {"continuous_over_static": ratios} if ratios else {}


# ---------------------------------------------------------------- (c) the decoding step


def step_paths(engine) -> list[tuple[str, object]]:
    """The decoding paths this engine can step with, as (name, a factory of a context manager that selects it):
    the growing DynamicCache (eager), the preallocated slots of XTTS_KV_CACHE=static (eager), and on CUDA the static
    step replayed as CUDA graphs (XTTS_CUDA_GRAPHS=auto: checked against the eager step first, eager if they
    differ)."""
    from batching.engine import decoding

    paths = [("dynamic", lambda: decoding(engine, "dynamic")), ("static", lambda: decoding(engine, "static"))]
    if engine.device.type == "cuda":
        paths.append(("static+graphs", lambda: decoding(engine, "static", "auto")))
    return paths


def step(ctx) -> dict:
    """ms per decoding step at each row count, the rows' histories first grown to ~--step-history positions."""
    from batching.engine import Segment
    from batching.params import SamplingParams

    engine, args = ctx.engine, ctx.args
    tokens = engine.tokenize(PARAGRAPH, "en")
    n_steps = args.step_history + args.step_warmup + args.step_steps
    params = SamplingParams(seed=3, min_new_tokens=n_steps + 1, max_new_tokens=n_steps + 8)
    rows: list[dict] = []
    for name, select in step_paths(engine):
        for n in args.step_rows:
            point = {"path": name, "rows": n}
            estimate = ctx.estimate(f"step{name}", ctx.estimate("step_last", 5.0)) * max(1.0, n / 8)
            if not ctx.budget.allows(estimate):
                point["skipped"] = f"time budget ({ctx.budget.left():.0f} s left)"
                rows.append(point)
                continue
            t0 = time.perf_counter()
            segments = [Segment(tokens, len(PARAGRAPH), ctx.latents[i % len(ctx.latents)], params) for i in range(n)]
            with select():
                point.update(_time_steps(ctx, segments, args))
            ctx.learn(f"step{name}", (time.perf_counter() - t0) / max(1.0, n / 8))
            ctx.learn("step_last", time.perf_counter() - t0)
            rows.append(point)
    done = [r for r in rows if "skipped" not in r]
    return {
        "status": "ok" if done else "skipped",
        **({} if done else {"skipped": "time budget: no point ran"}),
        "what": f"engine.admit of N rows of one ~{len(tokens)}-token paragraph, then engine.step until the rows' "
        f"histories reach ~{args.step_history} audio positions past their prompts (untimed), {args.step_warmup} "
        f"steps more untimed, then {args.step_steps} steps each timed alone (device synchronized around each); "
        "sampled (temperature 0.7, top-k 50, top-p 0.85, repetition penalty 5); the engine at the kit's precision. "
        "Paths: " + ", ".join(name for name, _ in step_paths(engine))
        + " (dynamic: the growing DynamicCache; static: preallocated slots; static+graphs, on CUDA: the static step "
        "replayed as CUDA graphs once its first replays matched the eager step)",
        "rows": rows,
    }


def _time_steps(ctx, segments, args) -> dict:
    import torch

    engine, device = ctx.engine, ctx.device
    keys = [f"step-row-{i}" for i in range(len(segments))]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    engine.reset()
    try:
        engine.admit(keys, segments)
        for _ in range(args.step_history + args.step_warmup):
            engine.step()
        times = []
        for _ in range(args.step_steps):
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            times.append(time.perf_counter() - t0)
        shape = engine.kv_shape
        graphs = engine.graphs is not None and engine.graphs.enabled  # False: graphs off, or fell back to eager
    finally:
        engine.reset()
    ms = np.array(times) * 1000
    return {
        "steps": len(times), "ms_per_step_mean": float(ms.mean()), "ms_per_step_p50": float(np.median(ms)),
        "ms_per_step_min": float(ms.min()), "kv_positions_per_row": int(shape[-2]) if shape else None, "graphs_replayed": graphs,
        "audio_s_per_step": len(segments) * engine.samples_for(1000) / 1000 / engine.sample_rate,
    }  # fmt: skip


# ---------------------------------------------------------------- targets and report


# Issue #24's targets (H200, full-size demo checkpoint, fp16): (name, figure's description, bound, "max"|"min").
TARGETS = (
    ("step_ms_1_row", "one decoding step at 1 row, ms", 2.0, "max"),
    ("step_ms_64_rows", "one decoding step at 64 rows, ms", 2.5, "max"),
    ("first_audio_c1_s", "first audio at c1 (scheduler level; the target is engine level), s", 0.080, "max"),
    ("c64_audio_s_per_s", "audio-s/s at c64 (continuous burst)", 1000.0, "min"),
    ("c64_vs_seed", "c64 continuous burst over the seed's path (same run)", 20.0, "min"),
    ("c32_stream_first_p95_s", "streamed jobs' first-audio p95 at c32 (continuous burst), s", 0.300, "max"),
)


def targets(sections: dict) -> dict:
    """Each target's measured figure (None when its section did not run) and whether it is met."""

    def point(c, kind="burst", scheduling="continuous"):
        return next((p for p in sections.get("load", {}).get("points", []) if "skipped" not in p and
                     (p["concurrency"], p["kind"], p["scheduling"]) == (c, kind, scheduling)), {})  # fmt: skip

    def step_ms(rows):  # the fastest path measured at that row count
        return min((r["ms_per_step_p50"] for r in sections.get("step", {}).get("rows", [])
                    if r.get("rows") == rows and "skipped" not in r), default=None)  # fmt: skip

    seed = sections.get("throughput", {}).get("seed_audio_s_per_s")
    c64 = point(64).get("audio_s_per_s")
    figures = {
        "step_ms_1_row": step_ms(1), "step_ms_64_rows": step_ms(64),
        "first_audio_c1_s": sections.get("first_audio", {}).get("paragraph", {}).get("first_audio_p50_s"),
        "c64_audio_s_per_s": c64, "c64_vs_seed": c64 / seed if c64 and seed else None,
        "c32_stream_first_p95_s": point(32).get("stream_first_audio_p95_s"),
    }  # fmt: skip
    out = {}
    for name, what, bound, kind in TARGETS:
        value = figures[name]
        met = None if value is None else (value <= bound if kind == "max" else value >= bound)
        out[name] = {"what": what, "bound": bound, "kind": kind, "measured": value, "met": met}
    return out


def _f(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(sections: dict, skipped) -> list[str]:
    """The stack sections of gpu-report.md; `skipped(name)` writes a skipped section's line and says so."""
    lines: list[str] = []
    if not skipped("first_audio"):
        a = sections["first_audio"]
        lines += ["## First audio at c1 (Scheduler.stream)", "", a["what"] + ".", "",
                  "| text | chars | first audio p50 s | whole p50 s | streamed total p50 s | first/whole | RTF |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name in ("paragraph", "short_sentence"):
            t = a.get(name, {})
            lines.append(f"| {name} | {t.get('chars', '–')} | {_f(t.get('first_audio_p50_s'))} | "
                         f"{_f(t.get('whole_latency_p50_s'))} | {_f(t.get('streamed_total_p50_s'))} | "
                         f"{_f(t.get('first_over_whole'), '.2f')} | {_f(t.get('rtf_c1'), '.4f')} |")  # fmt: skip
        lines.append("")
    if not skipped("load"):
        ld = sections["load"]
        lines += ["## Load: continuous against static", "", ld["what"] + ".", "",
                  "| c | kind | scheduling | requests | audio-s/s | RTF | p50 s | p95 s | short p50 s | streamed | "
                  "stream first p50 s | stream first p95 s | peak GPU MiB | errors |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for p in ld["points"]:
            head = f"| {p['concurrency']} | {p['kind']} | {p['scheduling']} | {p['requests']} |"
            if "skipped" in p:
                lines.append(f"{head} skipped: {p['skipped']} | | | | | | | | | |")
                continue
            lines.append(f"{head} {_f(p['audio_s_per_s'], '.2f')} | {_f(p['rtf'], '.4f')} | "
                         f"{_f(p['latency_p50_s'])} | {_f(p['latency_p95_s'])} | {_f(p['short_p50_s'])} | "
                         f"{p['streamed']} | {_f(p['stream_first_audio_p50_s'])} | {_f(p['stream_first_audio_p95_s'])} "
                         f"| {_f(p['peak_gpu_mem_mib'], '.0f')} | {p['n_errors']} |")  # fmt: skip
        for key, r in ld.get("continuous_over_static", {}).items():
            lines.append(f"\n{key}: continuous/static throughput {r['throughput']:.2f}x, p50 latency "
                         f"{r['latency_p50']:.2f}x, short-job p50 {_f(r['short_p50'], '.2f')}x.")  # fmt: skip
        lines.append("")
    if not skipped("step"):
        st = sections["step"]
        lines += ["## Decoding step", "", st["what"] + ".", "",
                  "| path | rows | KV positions/row | ms/step p50 | mean | min | audio s/step |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in st["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['path']} | {r['rows']} | skipped: {r['skipped']} | | | | |")
                continue
            lines.append(f"| {r['path']} | {r['rows']} | {r['kv_positions_per_row']} | {r['ms_per_step_p50']:.2f} | "
                         f"{r['ms_per_step_mean']:.2f} | {r['ms_per_step_min']:.2f} | {r['audio_s_per_step']:.3f} |")
        lines.append("")
    return lines


def targets_markdown(t: dict) -> list[str]:
    lines = ["## Issue #24's targets (meaningful on an H200 only)", "", "| target | bound | measured | met |",
             "|---|---:|---:|---|"]
    for r in t.values():
        sign = "≤" if r["kind"] == "max" else "≥"
        met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['what']} | {sign} {r['bound']:g} | {_f(r['measured'])} | {met} |")
    return lines + [""]
