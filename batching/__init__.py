"""The GPU side: the XTTS engine, the batch policy, the scheduler and the speaker-latent cache.

Names are exported lazily (PEP 562): `import batching.languages` or `batching.errors` does not import torch, so
the worker's configuration can validate a language in milliseconds.

`python -m batching` (batching/__main__.py) synthesizes one file straight through the engine, to check a
checkpoint, a device and a reference voice.
"""

from importlib import import_module

_EXPORTS = {
    "SamplingParams": "batching.params",
    "TextAudio": "batching.engine",
    "VoiceLatents": "batching.engine",
    "XttsEngine": "batching.engine",
    "EngineError": "batching.errors",
    "FatalEngineError": "batching.errors",
    "InputError": "batching.errors",
    "JobTimeoutError": "batching.errors",
    "ModelNotLoadedError": "batching.errors",
    "SUPPORTED_LANGUAGES": "batching.languages",
    "normalize_language": "batching.languages",
    "LatentCache": "batching.latents",
    "model_fingerprint": "batching.latents",
    "Observer": "batching.scheduler",
    "Scheduler": "batching.scheduler",
    "SpeechRequest": "batching.scheduler",
    "SpeechResult": "batching.scheduler",
    "StreamSettings": "batching.scheduler",
    "AudioChunk": "batching.streaming",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'batching' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
