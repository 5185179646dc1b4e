"""The languages XTTS-v2 speaks, and the one check every caller uses."""

from __future__ import annotations

from batching.errors import UnsupportedLanguageError

# The seed's 16 languages, then Hindi, which XTTS-v2 also speaks.
SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "pt", "en", "es", "fr", "de", "it", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "ja", "hu", "ko", "hi",
)  # fmt: skip

# XTTS's per-language character limits for one segment (coqui's VoiceBpeTokenizer.char_limits).
CHAR_LIMITS: dict[str, int] = {
    "en": 250, "de": 253, "fr": 273, "es": 239, "it": 213, "pt": 203, "pl": 224, "zh-cn": 82, "ar": 166,
    "cs": 186, "ru": 182, "nl": 251, "tr": 226, "ja": 71, "hu": 224, "ko": 95, "hi": 150,
}  # fmt: skip


def normalize_language(code: object) -> str:
    """Return the canonical code (`zh-cn`, `pt`, ...) or raise UnsupportedLanguageError naming it."""
    if isinstance(code, str):
        canonical = code.strip().lower().replace("_", "-")
        if canonical in SUPPORTED_LANGUAGES:
            return canonical
    raise UnsupportedLanguageError(
        f"language {code!r} is not supported; supported languages: {', '.join(SUPPORTED_LANGUAGES)}"
    )
