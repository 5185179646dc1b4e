"""Random-weight XTTS-v2 demo checkpoints, built through coqui-tts's own classes.

The released weights cannot be downloaded on every machine (CI, air-gapped test rigs). A demo checkpoint has
the released model's *architecture* (the same `Xtts` class, GPT-2 core, perceiver conditioning, HiFi-GAN and
speaker encoder) with random weights, so every code path of the worker runs for real; it just speaks noise.

    python -m batching.demo OUT_DIR --size tiny|small|full [--seed N]

writes `config.json`, `model.pth`, `vocab.json` (loadable by `Xtts.load_checkpoint`) and `DEMO.json`, the marker
that tells the engine this is a demo: a random GPT never predicts its stop token, so the engine ends each segment
itself after `tokens_per_char` audio tokens per character of text. `model.pth` carries the same marker under the
key "demo", so nobody can mistake the file for a real voice model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batching.languages import SUPPORTED_LANGUAGES

DEMO_MARKER_FILE = "DEMO.json"
DEMO_TOKENS_PER_CHAR = 1.4
# Bump when the builder changes what it writes: test fixtures key their cached checkpoints on it.
# 2: HiFi-GAN's weight-norm gains are random (see _randomize_weight_norm_gains).
BUILDER_VERSION = 2
# Each output channel's weight-norm gain g is scaled by a factor drawn uniformly from this range.
WEIGHT_NORM_GAIN_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class DemoSize:
    layers: int
    width: int
    heads: int
    text_tokens: int | None  # None: just the specials and characters; else padded to this many tokens


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(layers=2, width=128, heads=4, text_tokens=None),
    "small": DemoSize(layers=6, width=512, heads=8, text_tokens=None),
    # The released XTTS-v2 dimensions: 30 layers x 1024, 16 heads, 6681 text tokens.
    "full": DemoSize(layers=30, width=1024, heads=16, text_tokens=6681),
}

# Special tokens come first, in this order: coqui looks [START] and [STOP] up by name, and the released
# vocabulary has [STOP] at id 0.
_SPECIAL_TOKENS = ["[STOP]", "[UNK]", "[SPACE]", "[START]"]
# Characters the cleaned text of the 17 languages is made of (Korean is romanised, Chinese becomes pinyin
# with tone digits, Japanese becomes romaji): ASCII, Latin-1 and Latin Extended-A/B, Greek, Cyrillic, Arabic,
# Devanagari, and a little general punctuation.
_CHAR_RANGES = [
    (0x21, 0x7E),
    (0xA1, 0x24F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x600, 0x6FF),
    (0x900, 0x97F),
    (0x2010, 0x2027),
]


def _vocabulary(text_tokens: int | None) -> list[str]:
    tokens = _SPECIAL_TOKENS + [f"[{lang}]" for lang in SUPPORTED_LANGUAGES]
    tokens += [chr(c) for lo, hi in _CHAR_RANGES for c in range(lo, hi + 1) if chr(c).isprintable()]
    if text_tokens is not None:
        if text_tokens < len(tokens):
            raise ValueError(f"text_tokens must be >= {len(tokens)}, got {text_tokens}")
        tokens += [f"<unused{i}>" for i in range(text_tokens - len(tokens))]
    return tokens


def build_tokenizer_json(text_tokens: int | None = None) -> str:
    """A character-level `tokenizers` BPE vocabulary in the layout `VoiceBpeTokenizer` expects."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    tokens = _vocabulary(text_tokens)
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="[UNK]"))
    n_special = len(_SPECIAL_TOKENS) + len(SUPPORTED_LANGUAGES)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in tokens[:n_special]])
    return tokenizer.to_str(pretty=False)


def build_config(size: DemoSize, n_text_tokens: int):
    from TTS.tts.configs.xtts_config import XttsArgs, XttsAudioConfig, XttsConfig

    args = XttsArgs(
        gpt_layers=size.layers,
        gpt_n_model_channels=size.width,
        gpt_n_heads=size.heads,
        gpt_number_text_tokens=n_text_tokens,
        gpt_start_text_token=_SPECIAL_TOKENS.index("[START]"),
        gpt_stop_text_token=_SPECIAL_TOKENS.index("[STOP]"),
        # The released XTTS-v2 values from here on.
        gpt_max_audio_tokens=605,
        gpt_max_text_tokens=402,
        gpt_max_prompt_tokens=70,
        gpt_num_audio_tokens=1026,
        gpt_start_audio_token=1024,
        gpt_stop_audio_token=1025,
        gpt_use_masking_gt_prompt_approach=True,
        gpt_use_perceiver_resampler=True,
        decoder_input_dim=size.width,
        d_vector_dim=512,
        cond_d_vector_in_each_upsampling_layer=True,
    )
    return XttsConfig(
        model_args=args,
        audio=XttsAudioConfig(sample_rate=22050, output_sample_rate=24000),
        languages=list(SUPPORTED_LANGUAGES),
        temperature=0.75,
        length_penalty=1.0,
        repetition_penalty=5.0,
        top_k=50,
        top_p=0.85,
        gpt_cond_len=30,
        gpt_cond_chunk_len=4,
        max_ref_len=30,
        sound_norm_refs=False,
    )


def config_for(size: str):
    """The `XttsConfig` and tokenizer JSON of a demo checkpoint of `size`, without building any weights."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    spec = SIZES[size]
    vocab_json = build_tokenizer_json(spec.text_tokens)
    n_text_tokens = len(json.loads(vocab_json)["model"]["vocab"])
    return build_config(spec, n_text_tokens), vocab_json


def _randomize_weight_norm_gains(module, seed: int) -> None:
    """Scale every weight-norm gain g of `module` by a random factor per output channel.

    A freshly built weight-normed layer has g = ||v|| exactly, so its weight is v itself: folding the weight norm
    (XttsEngine) or dropping g entirely would give the same audio, and no test could tell. Real checkpoints have
    trained gains; random ones make demo checkpoints just as sensitive to how g is handled."""
    import torch
    from torch.nn.utils import parametrize

    lo, hi = WEIGHT_NORM_GAIN_RANGE
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if parametrize.is_parametrized(m, "weight"):
                g = m.parametrizations.weight.original0
                g.mul_(lo + (hi - lo) * torch.rand(g.shape, generator=gen, dtype=g.dtype))


def build(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint folder; the same `size` and `seed` give the same weights."""
    import torch
    from TTS.tts.models.xtts import Xtts

    config, vocab_json = config_for(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = {
        "demo": True,
        "warning": "RANDOM WEIGHTS: a demo checkpoint for tests and benchmarks, not a voice model.",
        "size": size,
        "seed": seed,
        "tokens_per_char": DEMO_TOKENS_PER_CHAR,
        "builder_version": BUILDER_VERSION,
    }

    torch.manual_seed(seed)
    model = Xtts(config)
    _randomize_weight_norm_gains(model.hifigan_decoder, seed)
    # Saved before .eval(): eval() builds the inference wrapper, whose extra keys a checkpoint must not have.
    state = {"model": model.state_dict(), "config": config.to_dict(), "demo": marker}

    tmp = out / "model.pth.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "model.pth")
    (out / "vocab.json").write_text(vocab_json, encoding="utf-8")
    config.save_json(str(out / "config.json"))
    (out / DEMO_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def read_marker(model_dir: str | Path) -> dict | None:
    """The demo marker of a checkpoint folder, or None for a real model."""
    path = Path(model_dir) / DEMO_MARKER_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def synthetic_voice(seconds: float = 3.0, sr: int = 22050, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A voice-like reference for the worker's warm-up, tests and benchmarks: a few harmonics with vibrato and a
    syllable-rate envelope, plus a little noise. Float32 mono at `sr`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    wav = 0.3 * envelope * wav / np.abs(wav).max() + 0.003 * rng.standard_normal(len(t))
    return wav.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batching.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write config.json, model.pth, vocab.json and DEMO.json into")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    out = build(ns.out_dir, ns.size, ns.seed)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"demo checkpoint ({ns.size}, seed {ns.seed}) written to {out} ({total / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
