"""The XTTS engine: one coqui-tts `Xtts` model on one device, driven one decoding step at a time.

Stock `Xtts.inference` decodes one sentence of one request at a time and then runs a second full GPT pass to
get the vocoder latents. This engine runs the same modules with the same weights, but:

- keeps a running batch that rows join and leave between any two decoding steps (XTTS_KV_CACHE=static:
  preallocated slots, batching.static_batch, whose step CUDA graphs can replay, batching.graphs; dynamic: a
  growing DynamicCache, batching.running):
  `admit(keys, segments)` prefills new rows and merges them into the KV cache, `step()` gives every running row
  one audio token and hands back the rows that finished, `evict(keys)` drops rows, `vocode(rows)` turns finished
  rows into audio. `generate(segments)` is the run-to-completion loop on top (tests, static scheduling, bench);
- XTTS's GPT-2 core has no position embedding of its own (text and audio positions are learned embeddings added
  outside, per row), so left-padding and masking give each row exactly the computation it would get alone,
  whenever it joins;
- samples every row with its own parameters and its own random stream, so a seeded row's audio does not depend
  on what it was batched with or when it joined;
- takes the vocoder latents from the decoding pass itself: the latent stock XTTS recomputes for audio token t
  is the final-norm hidden state that predicted token t, which decoding already computed.

Row lengths come from the sampling parameters (`min_new_tokens`, `max_new_tokens`) or from a length rule set at
load (demo checkpoints, whose random GPT never predicts its stop token, end each row by length): the decoding
loop itself has no special case.

Threads. The calls that touch the model or the running batch run on ONE thread at a time, the scheduler's engine
thread: condition, generate (and _decode), admit, step, evict, reset, vocode, and the running / kv_shape /
kv_positions views of the batch. Text preparation touches neither: prepare_text and tokenize read only the
tokenizer and its text cleaners, and the scheduler runs them off the engine thread (asyncio.to_thread in
Scheduler.submit, several jobs' texts at once, while the engine thread decodes). row_limits, reserve_positions,
demo_length and samples_for are arithmetic on settings fixed at load: the scheduler calls reserve_positions on
the event loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from batching.audio import join_segments
from batching.errors import EmptyTextError, TextTooLongError, UntokenizableTextError
from batching.graphs import GraphStep, graphs_wanted
from batching.languages import CHAR_LIMITS, normalize_language
from batching.params import SamplingParams
from batching.running import FinishedRow, RunningBatch, StepOutput, row_seed
from batching.static_batch import StaticBatch
from batching.text import split_text
from batching.vocoder import RowVocoder

# XTTS_KV_CACHE: static (batching/static_batch.py) or dynamic (batching/running.py); auto: static on CUDA, where
# CUDA graphs need it, dynamic on a CPU (where the static step has not yet been measured to cost nothing).
KV_CACHES = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class LengthRule:
    """Rows of exactly `tokens_per_char` audio tokens per character of text (at least 4): how a demo checkpoint,
    whose random GPT never predicts its stop token, gives batches realistic mixed lengths."""

    tokens_per_char: float

    def __call__(self, n_chars: int, max_tokens: int) -> tuple[int, int]:
        n = max(4, min(max_tokens, round(self.tokens_per_char * n_chars)))
        return n, n


@dataclass(frozen=True, eq=False)
class VoiceLatents:
    """Speaker conditioning: GPT conditioning latents [1, 32, width] and speaker embedding [1, 512, 1]."""

    gpt_cond_latent: torch.Tensor
    speaker_embedding: torch.Tensor


@dataclass(frozen=True, eq=False)
class Segment:
    """One row of a batch: tokenized text of one sentence segment, its voice and its parameters."""

    tokens: tuple[int, ...]
    n_chars: int
    voice: VoiceLatents
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True, eq=False)
class SegmentAudio:
    codes: np.ndarray  # int64 audio codes, as stock XTTS returns them (a final stop token included)
    wav: np.ndarray  # float32 mono at the engine's sample rate


@dataclass(frozen=True, eq=False)
class TextSegment:
    text: str
    tokens: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class TextAudio:
    wav: np.ndarray  # float32 mono
    sample_rate: int
    segments: list[SegmentAudio]

    @property
    def duration_s(self) -> float:
        return len(self.wav) / self.sample_rate


class XttsEngine:
    supports_steps = True  # admit/step/evict/vocode: the scheduler may run it continuously
    fold_weight_norm = True  # see _remove_weight_norm; StockEngine keeps stock XTTS's vocoder as it is
    last_vocoder_s: float | None = None  # seconds the last generate() spent in the vocoder (metrics)

    def __init__(
        self, model, device, *, demo: dict | None = None, gpt_dtype: torch.dtype | None = None, vocoder: str = "auto",
        length_rule: LengthRule | None = None, kv_cache: str = "auto", cuda_graphs: str = "auto",
    ):
        self.model = model
        self.device = torch.device(device)
        self.demo = demo  # the demo marker, for logs and metrics only: decoding never looks at it
        self.length_rule = length_rule
        # Autocast for the GPT decode (fp16 on CUDA by default); None keeps float32 (CPU, equivalence tests).
        self.gpt_dtype = gpt_dtype
        args = model.args
        self.sample_rate = int(args.output_sample_rate)
        self.input_sample_rate = int(args.input_sample_rate)
        self.languages = tuple(model.config.languages)
        gpt = model.gpt
        self.max_gen_tokens = int(gpt.max_gen_mel_tokens)
        self.max_text_tokens = int(args.gpt_max_text_tokens)
        self.start_audio = int(gpt.start_audio_token)
        self.stop_audio = int(gpt.stop_audio_token)
        self.n_audio = int(gpt.num_audio_tokens)
        tok = model.tokenizer.tokenizer
        self._unk = tok.token_to_id("[UNK]")
        self._space = tok.token_to_id("[SPACE]")
        cfg = model.config
        self.gpt_cond_len = int(cfg.gpt_cond_len)
        self.gpt_cond_chunk_len = int(cfg.gpt_cond_chunk_len)
        self.max_ref_len = int(cfg.max_ref_len)
        self.sound_norm_refs = bool(cfg.sound_norm_refs)
        if vocoder not in ("auto", "batched", "per_row"):
            raise ValueError(f"XTTS_VOCODER_BATCHING must be auto, batched or per_row, got {vocoder!r}")
        # Measured on a 2-core CPU: one row at a time is faster than a padded batch (python -m bench engine --vocoder).
        self.vocoder_batched = vocoder == "batched" or (vocoder == "auto" and self.device.type == "cuda")
        if self.fold_weight_norm:
            _remove_weight_norm(model.hifigan_decoder.waveform_decoder)
        self._init_running(kv_cache, cuda_graphs, gpt_dtype)
        # The most KV positions one row can hold: conditioning latents, start + text (< max) + stop, audio.
        perceiver = getattr(gpt, "conditioning_perceiver", None)
        cond_len = int(perceiver.latents.shape[0]) if perceiver is not None else 32
        self.max_row_positions = cond_len + self.max_text_tokens + 1 + self.max_gen_tokens

    def _init_running(self, kv_cache: str, cuda_graphs: str, gpt_dtype: torch.dtype | None) -> None:
        """The running batch: preallocated slots (static shapes, CUDA graphs) or the growing DynamicCache."""
        if kv_cache not in KV_CACHES:
            raise ValueError(f"XTTS_KV_CACHE must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        if kv_cache == "auto":
            kv_cache = "static" if self.device.type == "cuda" else "dynamic"
        self.kv_cache = kv_cache
        graphs = graphs_wanted(cuda_graphs, self.device)
        if graphs and kv_cache != "static":
            if cuda_graphs == "on":
                raise ValueError("XTTS_CUDA_GRAPHS=on needs XTTS_KV_CACHE=static (the graphs replay its static shapes)")
            graphs = False
        self._running = StaticBatch(self, keep_buffers=graphs) if kv_cache == "static" else RunningBatch(self)
        # Replayed CUDA graphs of the static step, checked against the eager step first (batching/graphs.py).
        self.graphs = GraphStep(self._running, strict=cuda_graphs == "on", dtype=gpt_dtype) if graphs else None

    @classmethod
    def load(cls, model_dir=None, model="xtts_v2", device="auto", gpt_dtype="auto", vocoder="auto", kv_cache="auto",
             cuda_graphs="auto"):
        from batching import loading

        loaded = loading.load(model_dir, model=model, device=device)
        dtype = _autocast_dtype(gpt_dtype, loaded.device)
        rule = LengthRule(float(loaded.demo["tokens_per_char"])) if loaded.demo else None
        return cls(loaded.model, loaded.device, demo=loaded.demo, gpt_dtype=dtype, vocoder=vocoder, length_rule=rule,
                   kv_cache=kv_cache, cuda_graphs=cuda_graphs)

    # ---------------------------------------------------------------- text

    def tokenize(self, text: str, language: str) -> tuple[int, ...]:
        """Token ids of one segment, as stock XTTS computes them, or a clear InputError."""
        language = normalize_language(language)
        text = text.strip().lower()
        if not text:
            raise EmptyTextError("gen_text is empty: give at least one speakable character")
        try:
            ids = self.model.tokenizer.encode(text, lang=language)
        except Exception as exc:  # the per-language cleaners raise many kinds of errors on odd input
            raise UntokenizableTextError(
                f"gen_text cannot be tokenized for language {language!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if all(t in (self._unk, self._space) for t in ids[1:]):
            raise UntokenizableTextError(
                f"gen_text has nothing XTTS can speak in language {language!r}: after cleaning, no character of "
                f"{text[:40]!r} is in the model's vocabulary"
            )
        # Stock XTTS asserts fewer than gpt_max_text_tokens tokens; the start and stop tokens come on top.
        if len(ids) >= self.max_text_tokens:
            raise TextTooLongError(
                f"a segment of gen_text is {len(ids)} tokens long; XTTS takes fewer than {self.max_text_tokens}"
            )
        return tuple(ids)

    def prepare_text(self, text: str, language: str) -> list[TextSegment]:
        """Split a request's text into segments within XTTS's per-language limits, and tokenize each."""
        language = normalize_language(language)
        if not isinstance(text, str) or not text.strip():
            raise EmptyTextError("gen_text is empty: give at least one speakable character")
        pieces = split_text(text, language, CHAR_LIMITS[language])
        segments = []
        for piece in pieces:
            try:
                segments.append(TextSegment(piece, self.tokenize(piece, language)))
            except UntokenizableTextError:
                if len(pieces) == 1:
                    raise
                # A lone "..." or emoji between sentences of a longer text: skip it, keep the rest.
        if not segments:
            raise UntokenizableTextError(f"gen_text has nothing XTTS can speak in language {language!r}")
        return segments

    # ---------------------------------------------------------------- conditioning

    @torch.inference_mode()
    def condition(self, wav: np.ndarray, sample_rate: int) -> VoiceLatents:
        """Speaker conditioning from a mono float32 reference, as `Xtts.get_conditioning_latents` computes it."""
        import torchaudio

        audio = torch.as_tensor(np.asarray(wav, dtype=np.float32)).reshape(1, -1)
        sr = self.input_sample_rate
        if sample_rate != sr:
            audio = torchaudio.functional.resample(audio, sample_rate, sr)
        audio = audio.clip(-1, 1)[:, : sr * self.max_ref_len].to(self.device)
        if self.sound_norm_refs:
            audio = (audio / torch.abs(audio).max()) * 0.75
        speaker_embedding = self.model.get_speaker_embedding(audio, sr)
        gpt_cond_latent = self.model.get_gpt_cond_latents(
            audio, sr, length=self.gpt_cond_len, chunk_length=self.gpt_cond_chunk_len
        )
        return VoiceLatents(gpt_cond_latent=gpt_cond_latent.float(), speaker_embedding=speaker_embedding.float())

    # ---------------------------------------------------------------- generation

    def demo_length(self, n_chars: int) -> int:
        """Audio tokens the length rule (a demo checkpoint's) gives a segment of `n_chars` characters."""
        assert self.length_rule is not None
        return self.length_rule(n_chars, self.max_gen_tokens)[1]

    def synthesize(self, text: str, language: str, voice: VoiceLatents, params: SamplingParams) -> TextAudio:
        """The single-request path: split, decode all segments of the text as one batch, join."""
        segments = [Segment(s.tokens, len(s.text), voice, params) for s in self.prepare_text(text, language)]
        audio = self.generate(segments)
        return TextAudio(join_segments([a.wav for a in audio], self.sample_rate), self.sample_rate, audio)

    @torch.inference_mode()
    def generate(self, segments: Sequence[Segment]) -> list[SegmentAudio]:
        """Decode, then vocode, a batch of segments; one SegmentAudio per segment, in order.

        A thin loop over the step-level calls (admit, step until every row is done, vocode), for tests, the
        static scheduler and the engine benchmark. The running batch must be empty: generate uses it."""
        if not segments:
            return []
        if len(self._running):
            raise RuntimeError("generate() needs an idle engine: rows are running")
        rows = self._decode_rows(segments)
        wavs = self.vocode(rows)
        self.release_memory()
        return [SegmentAudio(r.codes, w) for r, w in zip(rows, wavs, strict=True)]

    def _decode(self, segments: Sequence[Segment]) -> tuple[list[np.ndarray], list[torch.Tensor]]:
        """Decoding alone, to completion: each segment's codes and vocoder latents, in order."""
        rows = self._decode_rows(segments)
        return [r.codes for r in rows], [r.latents for r in rows]

    @torch.inference_mode()
    def _decode_rows(self, segments: Sequence[Segment]) -> list[FinishedRow]:
        keys = list(range(len(segments)))
        done: dict[int, FinishedRow] = {}
        try:
            self.admit(keys, segments)
            while len(self._running):
                for row in self.step().finished:
                    done[row.key] = row
        except BaseException:
            self.reset()
            raise
        return [done[k] for k in keys]

    # ---------------------------------------------------------------- the step-level calls (engine thread only)

    def row_limits(self, segment: Segment) -> tuple[int, int]:
        """(min, max) audio tokens for a row: its parameters' limits, else the length rule set at load, else
        (0, the model's maximum)."""
        p = segment.params
        if p.max_new_tokens is not None or p.min_new_tokens:
            hi = min(self.max_gen_tokens, p.max_new_tokens or self.max_gen_tokens)
            return min(max(0, p.min_new_tokens), hi), max(1, hi)
        if self.length_rule is not None:
            return self.length_rule(segment.n_chars, self.max_gen_tokens)
        return 0, self.max_gen_tokens

    def reserve_positions(self, segment: Segment) -> int:
        """KV positions a row can come to hold (its prefix and its longest audio), for admission budgets."""
        cond = int(segment.voice.gpt_cond_latent.shape[1])
        return cond + len(segment.tokens) + 2 + self.row_limits(segment)[1]

    @torch.inference_mode()
    def admit(self, keys: Sequence, segments: Sequence[Segment]) -> None:
        """Prefill the new rows' prefixes and merge them into the running batch (keys: any hashable, unique)."""
        self._running.admit(keys, segments)

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One audio token for every running row; rows that finished leave the batch and are returned."""
        if self.graphs is not None and self.graphs.enabled:
            return self._running.step(self.graphs)
        return self._running.step()

    def evict(self, keys) -> list:
        """Drop running rows (cancelled, past their deadline); returns the keys dropped. The static cache frees
        their slots, the dynamic one compacts."""
        return self._running.evict(keys)

    def reset(self) -> None:
        """Drop every running row (after a failed step)."""
        self._running.reset()

    @property
    def running(self) -> tuple:
        return tuple(self._running.keys)

    @property
    def kv_shape(self) -> tuple[int, ...] | None:
        return self._running.kv_shape

    @property
    def kv_positions(self) -> int:
        return self._running.kv_positions

    @torch.inference_mode()
    def vocode(self, rows: Sequence[FinishedRow]) -> list[np.ndarray]:
        """Waveforms of finished rows (HiFi-GAN on their latents), in order."""
        if not rows:
            return []
        started = time.perf_counter()
        wavs = self._vocode([r.latents for r in rows], [r.segment.voice.speaker_embedding for r in rows],
                            [r.segment.params.speed for r in rows])  # fmt: skip
        self.last_vocoder_s = time.perf_counter() - started
        return wavs

    def row_vocoder(self, segment: Segment) -> RowVocoder:
        """A row's incremental vocoder (batching.vocoder): its audio span by span, as its latents arrive."""
        return RowVocoder(self.model.hifigan_decoder, segment.voice.speaker_embedding, segment.params.speed)

    def latents_of(self, key) -> torch.Tensor:
        """[tokens so far, width]: a running row's vocoder latents (a view: use it before the next step)."""
        return self._running.latents(key)

    def vocode_span(self, vocoder: RowVocoder, latents: torch.Tensor, final: bool, max_frames: int | None) -> np.ndarray:
        """The next span of a row's audio (see RowVocoder.next_span); the scheduler times it itself."""
        return vocoder.next_span(latents, final, max_frames)

    def release_memory(self) -> None:
        """Give freed heap pages back to the OS (CPU). Call when idle: after every vocoder call, the pages it
        freed would have to be faulted in again by the next one."""
        if self.device.type == "cpu":
            _trim_heap()

    def prefix(self, segment: Segment) -> torch.Tensor:
        """[P, width]: conditioning latents, then start + text + stop token embeddings with their positions."""
        gpt = self.model.gpt
        ids = torch.tensor([gpt.start_text_token, *segment.tokens, gpt.stop_text_token], device=self.device)
        text = gpt.text_embedding(ids) + gpt.text_pos_embedding.emb.weight[: len(ids)]
        return torch.cat([segment.voice.gpt_cond_latent[0].to(self.device, text.dtype), text], dim=0)

    def _vocode(self, latents: list[torch.Tensor], speakers: list[torch.Tensor], speeds: list[float]) -> list[np.ndarray]:
        rows = [_stretch(lat[None], speed) for lat, speed in zip(latents, speeds, strict=True)]  # [1, T, width]
        decoder = self.model.hifigan_decoder
        if not self.vocoder_batched or len(rows) == 1:
            wavs = [decoder(lat, g=spk.to(self.device)) for lat, spk in zip(rows, speakers, strict=True)]
            return [_to_numpy(w) for w in wavs]
        out = _vocode_padded(decoder, rows, [spk.to(self.device) for spk in speakers])
        return [_to_numpy(out[i, :, : self.samples_for(lat.shape[1])]) for i, lat in enumerate(rows)]

    @property
    def vocoder_hop(self) -> int:
        """Samples per vocoder frame (HiFi-GAN's hop at the output rate: 256 for XTTS-v2)."""
        return int(self.model.hifigan_decoder.output_hop_length)

    def samples_for(self, n_latents: int) -> int:
        """Waveform length HiFi-GAN gives for n latents (its two linear interpolations, then its hop)."""
        decoder = self.model.hifigan_decoder
        frames = math.floor(n_latents * (decoder.ar_mel_length_compression / decoder.output_hop_length))
        if decoder.output_sample_rate != decoder.input_sample_rate:
            frames = math.floor(frames * (decoder.output_sample_rate / decoder.input_sample_rate))
        return frames * decoder.output_hop_length

    def autocast(self):
        """The autocast context of the GPT decode (XTTS_GPT_DTYPE); a no-op context for float32."""
        if self.gpt_dtype is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.gpt_dtype)


def _stretch(lat: torch.Tensor, speed: float) -> torch.Tensor:
    """[1, T, width] latents stretched for the row's speed (stock XTTS's length scale), as HiFi-GAN takes them."""
    length_scale = 1.0 / max(speed, 0.05)
    if length_scale != 1.0 and math.floor(lat.shape[1] * length_scale) >= 1:
        lat = F.interpolate(lat.transpose(1, 2), scale_factor=length_scale, mode="linear").transpose(1, 2)
    return lat


def _vocode_padded(decoder, rows: list[torch.Tensor], speakers: list[torch.Tensor]) -> torch.Tensor:
    """One HiFi-GAN batch, each shorter row padded by repeating its last latent (the caller cuts each row to the
    length it has alone). Only the last ~0.2 s of a padded row can differ from vocoding it alone (the convolutions
    see the padding instead of silence there)."""
    t_max = max(lat.shape[1] for lat in rows)
    batch = torch.cat([torch.cat([lat, lat[:, -1:].expand(1, t_max - lat.shape[1], -1)], 1) for lat in rows])
    g = torch.cat([spk.reshape(1, -1, 1) for spk in speakers])
    return decoder(batch, g=g)


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc). The vocoder's activations run to hundreds of MB per row on
    the CPU; without this, the worker's RSS keeps the high-water mark of every batch shape it has seen."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _to_numpy(wav: torch.Tensor) -> np.ndarray:
    return wav.float().cpu().reshape(-1).numpy().astype(np.float32, copy=False)


def _remove_weight_norm(module: torch.nn.Module) -> None:
    """Fold HiFi-GAN's weight-norm parametrizations into plain weights, as coqui's vocoder loader does for
    inference: the same output, without recomputing every weight at every call."""
    from torch.nn.utils import parametrize

    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


_seed = row_seed  # stock.py


def _autocast_dtype(name: str, device) -> torch.dtype | None:
    name = name.strip().lower()
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    table = {"float32": None, "fp32": None, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"XTTS_GPT_DTYPE must be auto, float32, float16 or bfloat16, got {name!r}")
    return table[name]


@contextlib.contextmanager
def decoding(engine: XttsEngine, kv_cache: str, cuda_graphs: str = "off"):
    """The engine decoding on another KV cache (XTTS_KV_CACHE) and CUDA-graph setting (XTTS_CUDA_GRAPHS) inside
    the block, then as before: for a benchmark that times the paths side by side on one model. Only between
    requests: the running rows, if any, are dropped."""
    before = (engine.kv_cache, engine._running, engine.graphs)
    engine.reset()
    try:
        engine._init_running(kv_cache, cuda_graphs, engine.gpt_dtype)
        yield engine
    finally:
        engine.reset()
        engine.kv_cache, engine._running, engine.graphs = before
