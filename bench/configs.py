"""The worker configurations a load run compares, as the worker settings that make each one.

- baseline: the seed (stock path + the seed's settings);
- unbatched: this worker's engine with the seed's settings (what the engine alone buys, without batching or caches);
- batched: the worker as deployed;
- static / continuous: the worker as deployed with SCHEDULING=static (whole batches run to completion) or
  SCHEDULING=continuous (the default: rows join and leave at every decoding step), to compare the two in one run;
- streaming: continuous with STREAMING=on (each job's audio streams before its result), against continuous: time
  to first audio beside the non-streamed latency of the same jobs (`python -m bench --stream`);
- http: continuous in HTTP mode (SERVER_MODE=http: OpenAI's speech API, the audio streamed in the response body),
  against streaming, the queue mode, on the same jobs (`python -m bench http`).
"""

from __future__ import annotations

# The seed's behaviour, as worker settings: one job at a time, one row per batch, no waiting for company, speaker
# latents recomputed for every job, and each row decoded as stock `Xtts.inference` decodes it (XTTS_ENGINE=stock:
# HF generate, a second GPT pass, HiFi-GAN with weight norm). LATENT_CACHE=off is the worker's switch for the
# latents; LATENT_CACHE_SIZE=1 and LATENT_CACHE_DIR='' are the emulation used before that switch existed.
UNBATCHED_SETTINGS: dict[str, str] = {
    "MAX_CONCURRENCY": "1",
    "MAX_BATCH_SIZE": "1",
    "BATCH_WAIT_MS": "0",
    "LATENT_CACHE": "off",
    "LATENT_CACHE_SIZE": "1",
    "LATENT_CACHE_DIR": "",
}
BASELINE_SETTINGS: dict[str, str] = {**UNBATCHED_SETTINGS, "XTTS_ENGINE": "stock"}
CONFIG_NAMES = ("baseline", "unbatched", "batched", "static", "continuous", "streaming", "http")


def batched_settings(max_concurrency: int = 32, max_batch_size: int = 8, batch_wait_ms: float = 15) -> dict:
    return {
        "MAX_CONCURRENCY": str(max_concurrency),
        "MAX_BATCH_SIZE": str(max_batch_size),
        "BATCH_WAIT_MS": f"{batch_wait_ms:g}",
        "LATENT_CACHE": "on",
    }


def config_settings(max_concurrency: int = 32, max_batch_size: int = 8,
                    batch_wait_ms: float = 15) -> dict[str, dict[str, str]]:  # fmt: skip
    """The settings of every configuration of CONFIG_NAMES, the batched ones with these batching settings."""
    batched = batched_settings(max_concurrency, max_batch_size, batch_wait_ms)
    return {
        "baseline": dict(BASELINE_SETTINGS),
        "unbatched": dict(UNBATCHED_SETTINGS),
        "batched": batched,
        "static": {**batched, "SCHEDULING": "static"},
        "continuous": {**batched, "SCHEDULING": "continuous"},
        "streaming": {**batched, "SCHEDULING": "continuous", "STREAMING": "on"},
        "http": {**batched, "SCHEDULING": "continuous", "SERVER_MODE": "http"},
    }
