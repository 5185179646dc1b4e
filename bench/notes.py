"""The notes of a load report: how the run was ordered, what each configuration is, which engines the workers
reported, the vocoder's share, whether the baseline really recomputed latents, and what the numbers do not say."""

from __future__ import annotations

import argparse

from bench.cli import is_local


def report_notes(a: argparse.Namespace, runs: list[dict], model: dict, faults_injected: bool) -> list[str]:
    """The notes of a load report: how it ran, what the configurations are, what the numbers do not say."""
    notes = []
    if is_local(a):
        configs = {r["config"] for r in runs}
        if "http" in configs:
            notes.append(
                "http = the worker in HTTP mode (SERVER_MODE=http): each job is one OpenAI speech request "
                "(POST /v1/audio/speech, response_format pcm, stream_format audio) straight to the worker's port, "
                "no job queue; its time to first audio is when the first byte of the response body reached the "
                "load generator, its latency when the last did. Its side has no queue_wait or batch size per job "
                "(the response carries only audio): see the worker's batch histogram.")
        if len(configs) > 1:
            notes.append(
                "Order: " + ("interleaved — every configuration's worker was up for the whole run, and each "
                             "load point ran on one configuration right after the other, so slow changes in the "
                             "machine's background load hit them alike."
                             if a.order == "interleaved" else
                             "sequential — one worker per configuration, stopped before the next one started."))
        if configs & {"baseline", "unbatched"}:
            notes.append(
                "Baseline = the seed's behaviour as worker settings: XTTS_ENGINE=stock (each row decoded as "
                "stock Xtts.inference does: Hugging Face generate, a second full GPT pass for the vocoder "
                "latents, HiFi-GAN with its weight norm), MAX_CONCURRENCY=1, MAX_BATCH_SIZE=1, BATCH_WAIT_MS=0 "
                "and LATENT_CACHE=off (speaker latents recomputed for every job). LATENT_CACHE_SIZE=1 and "
                "LATENT_CACHE_DIR='' are set too: the emulation used before the worker had the LATENT_CACHE "
                "switch (harmless beside it). The reference-audio disk cache stays on, as in the seed. "
                "Unbatched (when run) = the same settings on this worker's own engine (XTTS_ENGINE=batched): "
                "batched/unbatched is what batching and the caches buy, batched/baseline what the whole worker "
                "buys over the seed.")
            notes.append(
                "The MAX_CONCURRENCY=1 of baseline and unbatched includes the RunPod SDK's own pause: with every "
                "slot busy, JobScaler sleeps 1 s before asking for the next job (runpod 1.12). The seed ran "
                "with the SDK's default concurrency of 1 and paid the same.")
        engines = {}
        for r in runs:
            reported = [(p.get("worker_metrics") or {}).get("engine") for p in r["points"]]
            engines[r["run"]] = next((e for e in reported if e), None)
        if any(engines.values()):
            notes.append("Engines, as each worker's xtts_engine_info reported them: " + ", ".join(
                f"{run} = {e['engine']} (vocoder {e['vocoder']}, {e['device']})" if e else f"{run} = not reported"
                for run, e in engines.items()) + ".")  # fmt: skip
        shares = []
        for r in runs:
            for p in r["points"]:
                vocoder = ((p.get("worker_metrics") or {}).get("stages") or {}).get("vocoder")
                if vocoder and p.get("wall_s"):
                    shares.append(f"{r['run']} {p['label']} {vocoder['sum_s']:.1f} s of {p['wall_s']:.1f} s "
                                  f"({vocoder['sum_s'] / p['wall_s']:.0%})")  # fmt: skip
        if shares:
            notes.append("Vocoder (HiFi-GAN) time, from the worker's xtts_stage_duration_seconds{stage=\"vocoder\"}, "
                         "against the point's wall time: " + "; ".join(shares) + ".")  # fmt: skip
        for run in runs:
            if run["config"] not in ("baseline", "unbatched"):
                continue
            hits = sum(((p.get("worker_metrics") or {}).get("caches", {}).get("latents") or {}).get("hits", 0)
                       for p in run["points"])  # fmt: skip
            misses = sum(((p.get("worker_metrics") or {}).get("caches", {}).get("latents") or {}).get("misses", 0)
                         for p in run["points"])  # fmt: skip
            notes.append(f"Checked in {run['run']}: {hits} latent-cache hits and {misses} misses "
                         f"(computed conditionings) in the measured points"
                         + ("." if hits == 0 else " — NOT the seed's behaviour: the worker reused latents."))
        if (model or {}).get("demo"):
            notes.append(
                "Demo checkpoint: the released architecture with random weights (it speaks noise); each segment "
                "is ended after 1.4 audio tokens per character, so audio length follows text length.")
        if a.device == "cpu":
            notes.append(
                "CPU: the HiFi-GAN vocoder runs per row (XTTS_VOCODER_BATCHING=auto), at roughly 0.7 s per "
                "audio second here, and does not batch; GPT decoding and conditioning are what batching and "
                "the latent cache save. The load generator, emulator and fake RunPod share the machine "
                "with the worker.")
        gpu_seen = any((p.get("worker_metrics") or {}).get("gpu_memory_bytes") for r in runs for p in r["points"])
        notes.append(
            "GPU memory comes from the worker's xtts_gpu_memory_bytes gauge, which the worker sets once after "
            "loading the model (not a peak under load)" + ("." if gpu_seen else "; none reported on this device."))
    else:
        notes.append("Endpoint target: latency is measured by this client, through /status polling every "
                     f"{a.poll_interval_s:g} s ({a.mode}); worker metrics and RSS only when --metrics-url / "
                     "--worker-pid are given.")
    if faults_injected:
        notes.append("Faults were injected (--gcs-fail/--gcs-resets): errors may be expected.")
    return notes
