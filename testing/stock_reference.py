"""Stock coqui `Xtts.inference`, the reference the engine's output is compared with (tests and `bench.gpu`)."""

from __future__ import annotations

import numpy as np


def stock_inference(stock, text: str, language: str, voice, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Stock `Xtts.inference` on `stock.model` (an engine: `StockEngine`, or an `XttsEngine`, whose vocoder has its
    weight norm folded) with the demo length rule when the model is a demo one; returns (codes, wav)."""
    model = stock.model
    if stock.length_rule is not None:
        n = stock.demo_length(len(text))
        kwargs.update(min_new_tokens=n, max_new_tokens=n)
    captured = []
    generate = model.gpt.generate

    def capture(*args, **kw):
        codes = generate(*args, **kw)
        captured.append(codes[0].cpu().numpy())
        return codes

    model.gpt.generate = capture
    try:
        out = model.inference(text, language, voice.gpt_cond_latent.to(stock.device),
                              voice.speaker_embedding.to(stock.device), enable_text_splitting=False,
                              **kwargs)  # fmt: skip
    finally:
        del model.gpt.generate
    (codes,) = captured
    return codes.astype(np.int64), np.asarray(out["wav"], dtype=np.float32)
