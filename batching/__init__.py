"""The GPU side: the XTTS engine, the batch policy, the scheduler and the speaker-latent cache."""

from batching.engine import SamplingParams, Synthesis, VoiceLatents, XttsEngine
from batching.errors import EngineError, FatalEngineError, InputError, ModelNotLoadedError
from batching.languages import SUPPORTED_LANGUAGES, normalize_language
from batching.latents import LatentCache, model_fingerprint
from batching.scheduler import JobTimeoutError, Observer, Scheduler, SynthesisRequest, SynthesisResult

__all__ = [
    "SUPPORTED_LANGUAGES",
    "EngineError",
    "FatalEngineError",
    "InputError",
    "JobTimeoutError",
    "LatentCache",
    "ModelNotLoadedError",
    "Observer",
    "SamplingParams",
    "Scheduler",
    "Synthesis",
    "SynthesisRequest",
    "SynthesisResult",
    "VoiceLatents",
    "XttsEngine",
    "model_fingerprint",
    "normalize_language",
]
