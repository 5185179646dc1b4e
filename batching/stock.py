"""The seed's path, as a worker setting (XTTS_ENGINE=stock): the baseline the batched engine is measured against.

Each row goes through the steps of stock `Xtts.inference`, one row at a time: Hugging Face `generate` on coqui's
GPT inference model (one sequence, KV cache), then a second full GPT pass for the vocoder latents, then HiFi-GAN
with its weight norm left in place, exactly as `Xtts.load_checkpoint` leaves it. The steps are spelled out here
only because a row carries token ids, not text; tests/batching/test_stock.py checks that the audio is the same
as `Xtts.inference`'s for the same seed.

It shares everything else with XttsEngine (text splitting, conditioning, row length limits), so a run with
XTTS_ENGINE=stock differs from the batched worker only in how rows are decoded and vocoded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from batching.engine import Segment, SegmentAudio, XttsEngine, _seed, _to_numpy, _trim_heap


class StockEngine(XttsEngine):
    supports_steps = False  # whole rows, one at a time: static scheduling only
    fold_weight_norm = False  # stock XTTS vocodes with HiFi-GAN's weight-norm parametrizations in place

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocoder_batched = False  # one row at a time, whatever XTTS_VOCODER_BATCHING says

    @torch.inference_mode()
    def generate(self, segments: Sequence[Segment]) -> list[SegmentAudio]:
        self.last_vocoder_s = 0.0
        out = [self._row(s) for s in segments]
        if self.device.type == "cpu":
            _trim_heap()
        return out

    def _row(self, segment: Segment) -> SegmentAudio:
        model, gpt, p = self.model, self.model.gpt, segment.params
        torch.manual_seed(_seed(p.seed))
        extra = {}
        lo, hi = self.row_limits(segment)
        if (lo, hi) != (0, self.max_gen_tokens):  # a length rule (demo checkpoints) or the row's own limits
            extra = {"min_new_tokens": lo, "max_new_tokens": hi}
        cond = segment.voice.gpt_cond_latent.to(self.device)
        speaker = segment.voice.speaker_embedding.to(self.device)
        tokens = torch.tensor([segment.tokens], dtype=torch.int32, device=self.device)
        codes = gpt.generate(
            cond_latents=cond, text_inputs=tokens, do_sample=p.do_sample, top_p=p.top_p, top_k=p.top_k,
            temperature=p.temperature, num_return_sequences=model.gpt_batch_size, num_beams=1, length_penalty=1.0,
            repetition_penalty=p.repetition_penalty, output_attentions=False, **extra,
        )  # fmt: skip
        expected_len = torch.tensor([codes.shape[-1] * gpt.code_stride_len], device=self.device)
        text_len = torch.tensor([tokens.shape[-1]], device=self.device)
        latents = gpt(tokens, text_len, codes, expected_len, cond_latents=cond, return_attentions=False,
                      return_latent=True)  # fmt: skip
        length_scale = 1.0 / max(p.speed, 0.05)
        if length_scale != 1.0:
            latents = F.interpolate(latents.transpose(1, 2), scale_factor=length_scale, mode="linear").transpose(1, 2)
        started = time.perf_counter()
        wav = model.hifigan_decoder(latents, g=speaker)
        self.last_vocoder_s += time.perf_counter() - started
        return SegmentAudio(codes[0].cpu().numpy().astype("int64"), _to_numpy(wav))
