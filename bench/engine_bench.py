"""Engine benchmark: the seed's path against the batched engine, side by side in ONE run on one model.

    python -m bench engine [--size small] [--requests 16] [--voices 4] [--batch-sizes 1,4,8,16] [--device cpu]

(a) seed path: per request, speaker conditioning from the reference file (`Xtts.get_conditioning_latents`)
    and stock `Xtts.inference`, one request at a time, as the seed worker does;
(b) batched engine: speaker latents cached (computed once per voice, before timing), all segments of all
    requests decoded in batches of B rows, for each B.

Both generate the same requests (same texts, languages, voices, sampling parameters) with the same demo length
rule. The score is audio-seconds generated per wall-clock second; the report gives the ratio b/a. By default every
path runs twice, in forward then backward order (ABBA), and its two runs are summed: a machine that gets busier or
quieter during the run then biases no path. A last row times the vocoder alone on the same segments: on a CPU it
is the ceiling of every path (HiFi-GAN has a fixed size and does not batch there).
Results go to bench/results/engine-<size>-<device>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Short replies to short paragraphs, in several languages: a realistic mix for a voice API.
TEXTS = [
    ("Olá! Tudo bem com você?", "pt"),
    ("Sua consulta foi confirmada para amanhã às dez horas.", "pt"),
    ("Obrigado por ligar. Um atendente vai falar com você em instantes, por favor aguarde na linha.", "pt"),
    ("Hello, and welcome back.", "en"),
    ("Your package has shipped and should arrive on Thursday.", "en"),
    ("Thanks for waiting. I found three flights that match your dates; the cheapest leaves at seven.", "en"),
    ("¡Buenos días! ¿En qué puedo ayudarle?", "es"),
    ("La reunión se ha movido al jueves por la tarde.", "es"),
    ("Bonjour, votre commande est prête.", "fr"),
    ("Guten Tag, wie kann ich helfen?", "de"),
]


@dataclass(frozen=True)
class Request:
    text: str
    language: str
    voice: int
    seed: int


def make_requests(n: int, voices: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(*rng.choice(TEXTS), voice=i % voices, seed=rng.randrange(1 << 31)) for i in range(n)]


def write_voices(folder: Path, voices: int, seconds: float = 6.0) -> list[Path]:
    """The benchmark's reference voices (distinct synthetic voices, `seconds` each) as WAV files in `folder`."""
    import soundfile as sf

    from testing.voices import synthetic_voice

    paths = []
    for i in range(voices):
        path = folder / f"voice{i}.wav"
        sf.write(path, synthetic_voice(seconds, f0=100 + 37 * i, seed=i), 22050)
        paths.append(path)
    return paths


def seed_path(engine, requests: list[Request], refs: list[Path], params) -> tuple[float, float]:
    """Per request: conditioning from the file + stock Xtts.inference. Returns (audio seconds, wall seconds)."""
    import torch

    model = engine.model
    cfg = model.config
    audio_s = 0.0
    started = time.perf_counter()
    for r in requests:
        gpt_latent, speaker = model.get_conditioning_latents(
            str(refs[r.voice]), max_ref_length=cfg.max_ref_len, gpt_cond_len=cfg.gpt_cond_len,
            gpt_cond_chunk_len=cfg.gpt_cond_chunk_len,
        )  # fmt: skip
        torch.manual_seed(r.seed)
        extra = {}
        if engine.length_rule is not None:
            n = engine.demo_length(len(r.text))
            extra = {"min_new_tokens": n, "max_new_tokens": n}
        out = model.inference(r.text, r.language, gpt_latent, speaker, temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                              enable_text_splitting=False, **extra)  # fmt: skip
        audio_s += len(out["wav"]) / engine.sample_rate
    return audio_s, time.perf_counter() - started


def _segments(engine, requests: list[Request], latents: list, params) -> list:
    from dataclasses import replace

    from batching.engine import Segment

    segments = []
    for r in requests:
        for piece in engine.prepare_text(r.text, r.language):
            segments.append(Segment(piece.tokens, len(piece.text), latents[r.voice], replace(params, seed=r.seed)))
    # Similar lengths together, as the scheduler's policy does.
    segments.sort(key=lambda s: len(s.tokens))
    return segments


def batched_path(engine, requests: list[Request], latents: list, params, batch_size: int) -> tuple[float, float]:
    segments = _segments(engine, requests, latents, params)
    audio_s = 0.0
    started = time.perf_counter()
    for i in range(0, len(segments), batch_size):
        for audio in engine.generate(segments[i : i + batch_size]):
            audio_s += len(audio.wav) / engine.sample_rate
    return audio_s, time.perf_counter() - started


def vocoder_alone(engine, requests: list[Request], latents: list, params) -> tuple[float, float]:
    """The engine's vocoder step alone on the same segments (decoded first, untimed): (audio seconds, seconds)."""
    import torch

    audio_s = wall_s = 0.0
    segments = _segments(engine, requests, latents, params)
    with torch.inference_mode():
        for i in range(0, len(segments), 8):
            chunk = segments[i : i + 8]
            engine.admit(list(range(len(chunk))), chunk)
            rows = []
            while engine.running:
                rows += engine.step().finished
            rows.sort(key=lambda row: row.key)
            started = time.perf_counter()
            wavs = engine._vocode([r.latents for r in rows], [r.segment.voice.speaker_embedding for r in rows],
                                  [r.segment.params.speed for r in rows])  # fmt: skip
            wall_s += time.perf_counter() - started
            audio_s += sum(len(w) for w in wavs) / engine.sample_rate
    return audio_s, wall_s


def _cache_ratios(rows: list[dict]) -> dict[str, float]:
    """Per batch size: the static cache's audio-s/s over the dynamic one's, from the same ABBA run."""
    rate = {(r["batch_size"], r["kv_cache"]): r["audio_s_per_s"] for r in rows if r.get("kv_cache")}
    return {str(b): rate[(b, "static")] / rate[(b, "dynamic")] for b, c in rate if c == "static"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--model-dir", help="a checkpoint folder instead of a demo one")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--voices", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocoder", default="auto", choices=["auto", "batched", "per_row"])
    parser.add_argument("--kv-caches", default="dynamic",
                        help="the batched engine's KV caches to time, comma-separated (dynamic, static): each on "
                        "an engine of its own, in the same ABBA run (XTTS_KV_CACHE)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="abba", choices=["abba", "once"],
                        help="abba: each path twice, forward then backward, summed (drift in the machine's load "
                        "biases no path; twice as long); once: each path once, in order")  # fmt: skip
    parser.add_argument("--name", help="result file name (default engine-<size>-<device>)")
    ns = parser.parse_args(argv)

    import torch

    from batching.engine import SamplingParams, XttsEngine
    from batching.stock import StockEngine
    from testing.voices import demo_checkpoint

    batch_sizes = [int(b) for b in ns.batch_sizes.split(",")]
    model_dir = Path(ns.model_dir) if ns.model_dir else demo_checkpoint(ns.size)
    caches = ns.kv_caches.split(",")
    engines = {c: XttsEngine.load(model_dir, device=ns.device, vocoder=ns.vocoder, kv_cache=c) for c in caches}
    engine = engines[caches[0]]
    # The seed's path on a model of its own, loaded as coqui loads it (HiFi-GAN keeps its weight norm; the
    # batched engine folds it into its copy).
    stock = StockEngine.load(model_dir, device=ns.device)
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.85, repetition_penalty=5.0)
    requests = make_requests(ns.requests, ns.voices, ns.seed)

    with tempfile.TemporaryDirectory() as tmp:
        refs = write_voices(Path(tmp), ns.voices)
        import soundfile as sf

        # Warm-up (first calls load lazy code paths), not timed.
        warm = requests[:1]
        seed_path(stock, warm, refs, params)
        t0 = time.perf_counter()
        latents = [engine.condition(sf.read(p, dtype="float32")[0], 22050) for p in refs]
        conditioning_s = (time.perf_counter() - t0) / len(refs)
        for e in engines.values():
            batched_path(e, warm, latents, params, 1)

        paths = [("seed", 1, None)] + [("batched", b, c) for b in batch_sizes for c in caches]
        totals = {p: [0.0, 0.0] for p in paths}
        for path in paths + paths[::-1] if ns.order == "abba" else paths:
            kind, b, cache = path
            if kind == "seed":
                audio, wall = seed_path(stock, requests, refs, params)
            else:
                audio, wall = batched_path(engines[cache], requests, latents, params, b)
            totals[path][0] += audio
            totals[path][1] += wall
        seed_rate = totals[("seed", 1, None)][0] / totals[("seed", 1, None)][1]
        rows = []
        for (kind, b, cache), (audio, wall) in totals.items():
            name = ("seed (conditioning + stock Xtts.inference, one at a time)" if kind == "seed"
                    else "batched engine, cached latents" + (f" (KV cache: {cache})" if len(caches) > 1 else ""))
            rows.append({"path": name, "batch_size": b, "kv_cache": cache, "audio_s": audio, "wall_s": wall,
                         "audio_s_per_s": audio / wall, "ratio": audio / wall / seed_rate})  # fmt: skip
        audio, wall = vocoder_alone(engine, requests, latents, params)
        rows.append({"path": "vocoder alone, same segments (a ceiling on this device)", "batch_size": None,
                     "audio_s": audio, "wall_s": wall, "audio_s_per_s": audio / wall,
                     "ratio": audio / wall / seed_rate})  # fmt: skip

    command = "python -m bench engine " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "CPU"),
        "model": f"demo {ns.size}" if not ns.model_dir else str(model_dir),
        "device": str(engine.device),
        "vocoder": "batched" if engine.vocoder_batched else "per_row",
        "requests": ns.requests,
        "order": ns.order,
        "voices": ns.voices,
        "conditioning_s_per_voice": conditioning_s,
        "kv_caches": caches,
        "rows": rows,
        **({"static_over_dynamic": _cache_ratios(rows)} if {"static", "dynamic"} <= set(caches) else {}),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{ns.name or f'engine-{ns.size}-{engine.device.type}'}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwritten {out}")
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}` — {report['date']}, {report['machine']}, {report['model']} on {report['device']}, "
        f"{report['requests']} requests from {report['voices']} voices, vocoder {report['vocoder']}, "
        + ("each path run twice (forward, then backward order) and summed"
           if report.get("order") == "abba" else "each path run once"),
        "",
        "| path | batch | audio s | wall s | audio-s/s | vs seed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['path']} | {r['batch_size'] or '–'} | {r['audio_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['audio_s_per_s']:.2f} | {r['ratio']:.2f}x |")  # fmt: skip
    if report.get("static_over_dynamic"):
        lines += ["", "Static KV cache over dynamic, same run: " + ", ".join(
            f"batch {b}: {x:.3f}x" for b, x in report["static_over_dynamic"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
