"""The engine on a tiny demo checkpoint loaded through coqui's real `Xtts.load_checkpoint`."""

import math
import time

import numpy as np
import pytest
import torch

from batching.audio import join_segments
from batching.engine import SamplingParams, Segment
from batching.errors import EmptyTextError, TextTooLongError, UnsupportedLanguageError, UntokenizableTextError
from batching.languages import SUPPORTED_LANGUAGES
from testing.stock_reference import stock_inference
from testing.tolerances import WAVEFORM_TOLERANCE

GREEDY = SamplingParams(do_sample=False)

SENTENCES = {
    "pt": "Olá! Este é um exemplo de síntese de voz.",
    "en": "Hello, this is a voice synthesis example.",
    "es": "Hola, este es un ejemplo de síntesis de voz.",
    "fr": "Bonjour, ceci est un exemple de synthèse vocale.",
    "de": "Hallo, dies ist ein Beispiel für Sprachsynthese.",
    "it": "Ciao, questo è un esempio di sintesi vocale.",
    "pl": "Cześć, to jest przykład syntezy mowy.",
    "tr": "Merhaba, bu bir ses sentezi örneğidir.",
    "ru": "Привет, это пример синтеза речи.",
    "nl": "Hallo, dit is een voorbeeld van spraaksynthese.",
    "cs": "Ahoj, toto je příklad syntézy řeči.",
    "ar": "مرحبا، هذا مثال على تركيب الكلام.",
    "zh-cn": "你好，这是一个语音合成的例子。",
    "ja": "こんにちは、これは音声合成の例です。",
    "hu": "Helló, ez egy beszédszintézis példa.",
    "ko": "안녕하세요, 이것은 음성 합성의 예입니다.",
    "hi": "नमस्ते, यह वाक् संश्लेषण का एक उदाहरण है।",
}


def expected_samples(n_tokens: int, speed: float = 1.0) -> int:
    """Output length of coqui's HiFi-GAN decoder for n latents: x4 (1024/256), x24000/22050, x256 hop."""
    n = math.floor(n_tokens / speed) if speed != 1.0 else n_tokens
    return math.floor(math.floor(n * 4.0) * (24000 / 22050)) * 256


@pytest.fixture(scope="module")
def voice(tiny_engine, voice_wav):
    return tiny_engine.condition(voice_wav, 22050)


def test_checkpoint_says_it_is_a_demo(tiny_checkpoint, tiny_engine):
    checkpoint = torch.load(tiny_checkpoint / "model.pth", map_location="cpu", weights_only=False)
    assert checkpoint["demo"]["demo"] is True
    assert "RANDOM WEIGHTS" in checkpoint["demo"]["warning"]
    assert tiny_engine.demo["demo"] is True
    assert tiny_engine.sample_rate == 24000


def test_conditioning_matches_coqui(tiny_engine, voice_wav, tmp_path):
    import soundfile as sf

    path = tmp_path / "ref.wav"
    sf.write(path, voice_wav, 22050, subtype="FLOAT")
    ours = tiny_engine.condition(voice_wav, 22050)
    m = tiny_engine.model
    gpt_latent, speaker = m.get_conditioning_latents(
        str(path), max_ref_length=m.config.max_ref_len, gpt_cond_len=m.config.gpt_cond_len,
        gpt_cond_chunk_len=m.config.gpt_cond_chunk_len,
    )  # fmt: skip
    assert ours.gpt_cond_latent.shape == gpt_latent.shape == (1, 32, m.args.gpt_n_model_channels)
    assert ours.speaker_embedding.shape == speaker.shape == (1, 512, 1)
    torch.testing.assert_close(ours.gpt_cond_latent, gpt_latent, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.speaker_embedding, speaker, rtol=0, atol=1e-5)


@pytest.mark.parametrize("language", SUPPORTED_LANGUAGES)
def test_synthesizes_every_language(tiny_engine, voice, language):
    result = tiny_engine.synthesize(SENTENCES[language], language, voice, SamplingParams(seed=1))
    assert result.sample_rate == 24000
    assert result.wav.dtype == np.float32 and result.wav.ndim == 1
    assert np.isfinite(result.wav).all()
    assert len(result.segments) == 1
    codes = result.segments[0].codes
    assert len(codes) == tiny_engine.demo_length(len(SENTENCES[language]))
    assert ((codes >= 0) & (codes < 1024)).all()  # audio codes only: no start/stop token inside
    assert len(result.wav) == expected_samples(len(codes))
    assert result.duration_s == pytest.approx(len(result.wav) / 24000)


@pytest.mark.parametrize("speed", [1.0, 1.3])
def test_single_request_equals_stock_xtts_inference_under_greedy_decoding(tiny_engine, tiny_stock_engine, voice,
                                                                         speed):  # fmt: skip
    text, language = "Hello there, this is a comparison with stock coqui.", "en"
    ours = tiny_engine.synthesize(text, language, voice, SamplingParams(do_sample=False, speed=speed))
    # Stock inference on a model of its own: HiFi-GAN with its weight norm, as Xtts.load_checkpoint leaves it.
    codes, wav = stock_inference(tiny_stock_engine, text, language, voice, do_sample=False, repetition_penalty=5.0,
                                 speed=speed)  # fmt: skip
    np.testing.assert_array_equal(ours.segments[0].codes, codes)
    assert ours.wav.shape == wav.shape == (expected_samples(len(codes), speed),)
    assert np.abs(ours.wav - wav).max() < WAVEFORM_TOLERANCE


def test_long_text_is_split_and_joined(tiny_engine, voice):
    text = "你好。" * 40  # 120 characters; XTTS's limit for Chinese is 82
    started = time.perf_counter()
    result = tiny_engine.synthesize(text, "zh-cn", voice, GREEDY)
    assert 0 < tiny_engine.last_vocoder_s < time.perf_counter() - started  # the vocoder's share, for metrics
    assert len(result.segments) == 2
    assert len(result.wav) == sum(len(s.wav) for s in result.segments)


def test_joins_fade_instead_of_clicking():
    sr = 24000
    a = np.full(2400, 0.5, dtype=np.float32)
    b = np.full(2400, -0.5, dtype=np.float32)
    joined = join_segments([a, b], sr)
    assert len(joined) == 4800
    assert np.abs(np.diff(joined)).max() < 0.01  # a hard cut would jump by 1.0
    assert joined[0] == 0.5 and joined[-1] == -0.5  # the outer edges are left alone


def test_unsupported_language_is_a_clear_error(tiny_engine, voice):
    with pytest.raises(UnsupportedLanguageError, match="'xx' is not supported; supported languages: pt, en"):
        tiny_engine.synthesize("hello", "xx", voice, GREEDY)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_a_clear_error(tiny_engine, voice, text):
    with pytest.raises(EmptyTextError, match="gen_text is empty"):
        tiny_engine.synthesize(text, "en", voice, GREEDY)


def test_untokenizable_text_is_a_clear_error(tiny_engine, voice):
    with pytest.raises(UntokenizableTextError, match="nothing XTTS can speak"):
        tiny_engine.synthesize("😀😀😀 ☃", "en", voice, GREEDY)


def test_untokenizable_piece_inside_a_longer_text_is_skipped(tiny_engine):
    text = "Uma frase. " * 18 + "\n" + "😀" * 195 + "\n" + "Outra frase. " * 15
    segments = tiny_engine.prepare_text(text, "pt")
    assert [s.text for s in segments] == [("Uma frase. " * 18).strip(), ("Outra frase. " * 15).strip()]


def test_too_many_tokens_is_a_clear_error(tiny_engine):
    with pytest.raises(TextTooLongError, match="fewer than 402"):
        tiny_engine.tokenize("a" * 500, "en")


def test_batch_rows_end_at_their_own_length(tiny_engine, voice):
    texts = ["Curta.", "Uma frase bem mais longa que a primeira, para ver o comprimento."]
    segments = [Segment(tiny_engine.tokenize(t, "pt"), len(t), voice, GREEDY) for t in texts]
    short, long = tiny_engine.generate(segments)
    assert len(short.codes) == tiny_engine.demo_length(len(texts[0]))
    assert len(long.codes) == tiny_engine.demo_length(len(texts[1]))
    assert len(short.wav) == expected_samples(len(short.codes))
    assert len(long.wav) == expected_samples(len(long.codes))
