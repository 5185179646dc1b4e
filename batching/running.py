"""The running batch of the step-level engine: the KV cache and the per-row decoding state, one step at a time.

    admit(keys, segments)   prefill the new rows' prefixes (conditioning latents + text) and merge them into the
                            running KV cache; each new row starts at audio position 0 with its own random stream
    step()                  one audio token for every running row; rows that finished leave the batch at once
    evict(keys)             drop rows (cancelled, past their deadline) before they cost another step

Layout. Every per-row tensor has the batch on dim 0, in the same order as `keys`. The KV cache (a transformers
`DynamicCache`, each layer's keys and values shaped [rows, heads, columns, head_dim]) and the attention mask
[rows, columns] share one column axis. A row's real positions are contiguous and right-aligned: rows that joined
with a shorter history are left-padded (mask 0). When rows leave, the leading columns that every remaining row
masks are dropped, so padding never outlives the rows that needed it: the cache holds at most
rows x max(prefix + tokens so far) positions.

Why joining is exact. XTTS's GPT-2 core has no position embedding of its own; text and audio positions are learned
embeddings added to each input outside the core, per row (a row's audio position is its own token count, not the
batch's step number). Masked columns contribute exactly nothing to attention. So a row's tokens depend only on its
prefix, its parameters and its seed: not on when it joined or which rows it ran beside.

Only the engine thread may touch a RunningBatch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from batching import sampling

# Per-row tensors: name -> padding value along dim 1 when two groups of rows are concatenated (None: no dim 1).
_ROW_FIELDS = {
    "pos": None,  # audio tokens generated so far (the next token's audio position)
    "next_tok": None,  # the token to feed at the next step (the start audio token for a new row)
    "min_new": None,  # the stop token is masked until a row has this many tokens
    "max_new": None,  # a row ends after this many tokens
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "penalty": None,
    "sample": None,
    "seen": None,  # [rows, n_audio] tokens the repetition penalty sees
    "uniforms": 0.0,  # [rows, max_new]: the row's own random stream, one draw per audio position
    "codes": -1,  # [rows, max_new]
    "hidden": 0.0,  # [rows, max_new, width]: final-norm hidden states, the vocoder latents
}


@dataclass(frozen=True, eq=False)
class FinishedRow:
    """A row that left the batch because it is done: what the vocoder needs."""

    key: object
    segment: object  # batching.engine.Segment
    codes: np.ndarray  # int64, as stock XTTS returns them (a final stop token included when one was sampled)
    latents: torch.Tensor  # [tokens, width] float32, on the engine's device


@dataclass(frozen=True, eq=False)
class StepOutput:
    keys: tuple  # the rows that took part in the step, in batch order
    codes: tuple[int, ...]  # each one's new audio code
    finished: list[FinishedRow]  # rows that ended with this step (no longer in the batch)


def row_seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else int(seed) & ((1 << 63) - 1)


class RunningBatch:
    def __init__(self, engine):
        self.engine = engine
        self.keys: list = []
        self.segments: list = []
        self.cache = None  # transformers DynamicCache, or None when no row runs
        self.mask: torch.Tensor | None = None  # [rows, columns] long
        self.t: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.keys)

    # ---------------------------------------------------------------- size (asserted by tests on tensor shapes)

    @property
    def kv_shape(self) -> tuple[int, ...] | None:
        """Shape of one layer's key tensor: (rows, heads, columns, head_dim); None when the cache is empty."""
        if self.cache is None:
            return None
        return tuple(self.cache.layers[0].keys.shape)

    @property
    def kv_positions(self) -> int:
        """Cache positions held, padding included: rows x columns."""
        shape = self.kv_shape
        return 0 if shape is None else shape[0] * shape[2]

    # ---------------------------------------------------------------- admit

    def admit(self, keys: Sequence, segments: Sequence) -> None:
        if len(keys) != len(segments):
            raise ValueError(f"admit takes one key per segment, got {len(keys)} keys for {len(segments)} segments")
        if not segments:
            return
        if set(keys) & set(self.keys) or len(set(keys)) != len(keys):
            raise ValueError("a row key is already running")
        cache, mask, width = self._prefill(segments)
        new = self._row_tables(segments, width)
        if self.cache is None:
            self.cache, self.mask, self.t = cache, mask, new
        else:
            self._merge(cache, mask, new)
        self.keys += list(keys)
        self.segments += list(segments)

    def _prefill(self, segments: Sequence) -> tuple:
        """The new rows' prefixes, left-padded, through the GPT: their cache, their mask and the width."""
        from transformers import DynamicCache

        e = self.engine
        gpt, dev = e.model.gpt, e.device
        prefixes = [e.prefix(s) for s in segments]
        b, width = len(prefixes), prefixes[0].shape[1]
        p_max = max(p.shape[0] for p in prefixes)
        x = torch.zeros(b, p_max, width, device=dev)
        mask = torch.zeros(b, p_max, dtype=torch.long, device=dev)
        for i, p in enumerate(prefixes):
            x[i, p_max - p.shape[0] :] = p
            mask[i, p_max - p.shape[0] :] = 1
        cache = DynamicCache(config=gpt.gpt.config)
        with e.autocast():
            gpt.gpt(inputs_embeds=x, attention_mask=mask, past_key_values=cache, use_cache=True)
        return cache, mask, width

    def _row_tables(self, segments: Sequence, width: int) -> dict[str, torch.Tensor]:
        """The new rows' per-row state: positions, limits, sampling parameters, random streams, outputs."""
        e, dev, b = self.engine, self.engine.device, len(segments)
        limits = [e.row_limits(s) for s in segments]
        t_max = max(hi for _, hi in limits)
        params = [s.params for s in segments]
        seen = torch.zeros(b, e.n_audio, dtype=torch.bool, device=dev)
        # Stock XTTS's input_ids hold its dummy prefix ids (1) and the start token, which the repetition penalty
        # sees too: keep that, so greedy output is identical.
        seen[:, 1] = True
        seen[:, e.start_audio] = True
        uniforms = torch.zeros(b, t_max, dtype=torch.float64)
        for i, (p, (_, hi)) in enumerate(zip(params, limits, strict=True)):
            # The row's own stream, as long as the row can be: the same seed gives the same draws in any batch.
            uniforms[i, :hi] = torch.rand(hi, generator=torch.Generator().manual_seed(row_seed(p.seed)),
                                          dtype=torch.float64)  # fmt: skip
        return {
            "pos": torch.zeros(b, dtype=torch.long, device=dev),
            "next_tok": torch.full((b,), e.start_audio, dtype=torch.long, device=dev),
            "min_new": torch.tensor([lo for lo, _ in limits], device=dev),
            "max_new": torch.tensor([hi for _, hi in limits], device=dev),
            "temperature": torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev),
            "top_k": torch.tensor([min(max(p.top_k, 1), e.n_audio) for p in params], device=dev),
            "top_p": torch.tensor([p.top_p for p in params], device=dev),
            "penalty": torch.tensor([p.repetition_penalty for p in params], device=dev),
            "sample": torch.tensor([p.do_sample for p in params], device=dev),
            "seen": seen,
            "uniforms": uniforms.to(dev),
            "codes": torch.full((b, t_max), -1, dtype=torch.long, device=dev),
            "hidden": torch.zeros(b, t_max, width, device=dev),
        }

    def _merge(self, cache, mask: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        from transformers import DynamicCache

        cols = max(self.mask.shape[1], mask.shape[1])
        layers = []
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            k = torch.cat([_pad_left(old_layer.keys, cols, 2), _pad_left(new_layer.keys, cols, 2)])
            v = torch.cat([_pad_left(old_layer.values, cols, 2), _pad_left(new_layer.values, cols, 2)])
            layers.append((k, v))
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.engine.model.gpt.gpt.config)
        self.mask = torch.cat([_pad_left(self.mask, cols, 1), _pad_left(mask, cols, 1)])
        for name, fill in _ROW_FIELDS.items():
            a, b = self.t[name], new[name]
            if fill is not None and a.shape[1] != b.shape[1]:
                n = max(a.shape[1], b.shape[1])
                a, b = _pad_right(a, n, fill), _pad_right(b, n, fill)
            self.t[name] = torch.cat([a, b])

    # ---------------------------------------------------------------- step

    def step(self) -> StepOutput:
        if not self.keys:
            return StepOutput((), (), [])
        e = self.engine
        gpt, dev, t = e.model.gpt, e.device, self.t
        b = len(self.keys)
        rows = torch.arange(b, device=dev)
        pos = t["pos"]
        x = gpt.mel_embedding(t["next_tok"]) + gpt.mel_pos_embedding.emb.weight[pos]
        self.mask = torch.cat([self.mask, torch.ones(b, 1, dtype=self.mask.dtype, device=dev)], dim=1)
        with e.autocast():
            out = gpt.gpt(inputs_embeds=x[:, None, :], attention_mask=self.mask, past_key_values=self.cache,
                          use_cache=True)  # fmt: skip
            h = gpt.final_norm(out.last_hidden_state[:, -1]).float()
            logits = gpt.mel_head(h).float()
        t["hidden"][rows, pos] = h

        pen = t["penalty"][:, None]
        logits = torch.where(t["seen"], torch.where(logits < 0, logits * pen, logits / pen), logits)
        # Hugging Face's min_new_tokens: the stop token cannot come before a row's minimum length.
        logits[:, e.stop_audio] = logits[:, e.stop_audio].masked_fill(pos < t["min_new"], -math.inf)
        greedy = logits.argmax(-1)
        sampled = sampling.sample(logits, t["temperature"][:, None], t["top_k"][:, None], t["top_p"][:, None],
                          t["uniforms"][rows, pos])  # fmt: skip
        tok = torch.where(t["sample"], sampled, greedy)

        t["codes"][rows, pos] = tok
        t["seen"][rows, tok] = True
        t["pos"] = pos = pos + 1
        t["next_tok"] = tok
        done = (tok == e.stop_audio) | (pos >= t["max_new"])

        keys = tuple(self.keys)
        codes = tuple(tok.tolist())
        finished = []
        done_list = done.tolist()
        if any(done_list):
            lengths = pos.tolist()
            for i, d in enumerate(done_list):
                if d:
                    n = lengths[i]
                    finished.append(FinishedRow(self.keys[i], self.segments[i], t["codes"][i, :n].cpu().numpy(),
                                                t["hidden"][i, :n].clone()))  # fmt: skip
            self._keep([i for i, d in enumerate(done_list) if not d])
        return StepOutput(keys, codes, finished)

    def latents(self, key) -> torch.Tensor:
        """[tokens so far, width]: the vocoder latents of a running row (a view into the batch's buffer)."""
        i = self.keys.index(key)
        return self.t["hidden"][i, : int(self.t["pos"][i])]

    # ---------------------------------------------------------------- leave

    def evict(self, keys) -> list:
        """Drop these rows (those not running are ignored); returns the keys dropped."""
        gone = set(keys)
        dropped = [k for k in self.keys if k in gone]
        if dropped:
            self._keep([i for i, k in enumerate(self.keys) if k not in gone])
        return dropped

    def reset(self) -> None:
        self.keys, self.segments = [], []
        self.cache, self.mask, self.t = None, None, {}

    def _keep(self, indices: list[int]) -> None:
        if not indices:
            self.reset()
            return
        idx = torch.tensor(indices, device=self.engine.device)
        self.keys = [self.keys[i] for i in indices]
        self.segments = [self.segments[i] for i in indices]
        self.mask = self.mask[idx]
        # Compaction: drop the leading columns that every remaining row masks.
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        for name in _ROW_FIELDS:
            self.t[name] = self.t[name][idx]
        # Leftover per-row buffer width (the longest row that left) is trimmed too.
        longest = int(self.t["max_new"].max())
        for name, fill in _ROW_FIELDS.items():
            if fill is not None and self.t[name].shape[1] > longest:
                self.t[name] = self.t[name][:, :longest]


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    extra = n - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)


def _pad_right(x: torch.Tensor, n: int, fill) -> torch.Tensor:
    extra = n - x.shape[1]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[1] = extra
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim=1)
