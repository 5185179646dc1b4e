"""How close two waveforms of the same rows must be (float rounding of batched vs alone, continuous vs static,
incremental vs whole-row vocoding): shared by the engine and scheduler tests."""

# Stock XTTS's second GPT pass recomputes the vocoder latents without a KV cache; ours come from the decoding
# pass itself, and our HiFi-GAN has its weight norm folded. Both are float32, the waveforms (RMS ~0.013 on the
# tiny demo model) agree to float rounding. Measured max |diff|: 3.4e-8 against a separately loaded stock model
# (greedy, 4 mixed rows), 3.4e-8 seeded alone vs in a batch of 6, 3.2e-8 alone vs in a batch of 16, 3.8e-8
# batched vs per-row vocoder (outside the padded tail). The bound is ~10x the largest. For scale:
# 1% noise on the vocoder latents moves the waveform by 7e-5..1e-4, which the old bound of 1e-4 let through.
WAVEFORM_TOLERANCE = 4e-7
