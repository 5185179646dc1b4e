"""The sampler of the step-level engine: every row with its own parameters and its own random number.

`sample` reproduces Hugging Face's temperature, top-k and top-p warpers (their order and their tie rules) on a
batch whose rows carry different parameters, then draws one token per row by inverse CDF from the row's own
uniform number `u`: token j comes out for u in [P(j-1), P(j)). A row's draw depends only on its logits, its
parameters and its u, never on the rows beside it (batching.running keeps one random stream per row).
"""

from __future__ import annotations

import math

import torch


def sample(logits, temperature, top_k, top_p, u) -> torch.Tensor:
    """Per-row temperature, top-k, top-p (in Hugging Face's order and rules), then inverse-CDF sampling."""
    scores = logits / temperature
    desc, _ = scores.sort(dim=-1, descending=True)
    kth = desc.gather(1, top_k - 1)
    scores = scores.masked_fill(scores < kth, -math.inf)
    asc, asc_idx = scores.sort(dim=-1)
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[:, -1] = False
    scores = scores.masked_fill(remove.scatter(1, asc_idx, remove), -math.inf)
    probs = scores.softmax(dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[1] - 1)
