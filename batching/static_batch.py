"""The running batch on preallocated slots: RunningBatch's contract (admit, step, evict, reset, latents) with
static shapes, the decoding step that CUDA graphs can capture (batching/graphs.py).

Layout. Every layer's keys and values live in one buffer [slots, heads, capacity, head_dim] allocated once (and
doubled, rarely, when more slots or positions are needed). A row owns one slot from admission to the step it
finishes: its positions are contiguous from column 0, its own length says how far, and its new key and value are
written at that column. Attention reads columns [0, width) of the first `n` slots (n: one past the highest slot in
use, width: the longest length rounded up to COLUMN_BLOCK) and masks each row beyond its own length. So a row joins
by filling a free slot and leaves by freeing it: no `torch.cat` per step, no compaction copy, and the step's shapes
change only when `n` or `width` crosses a block, which is what lets a captured graph be replayed.

Exactness. The step is GPT-2's block (ln_1, attention, c_proj, ln_2, MLP, residuals, ln_f), the same modules and
weights as Hugging Face's forward, with scaled-dot-product attention over the row's own positions; XTTS's GPT has
no position embedding inside the core (wpe is null), so a row's column never enters its arithmetic. Masked columns
and free slots contribute exactly nothing. Prefill runs through Hugging Face's own forward, as RunningBatch does,
and its keys and values are copied into the slots. The tests hold it to stock `Xtts.inference`'s greedy codes and
to RunningBatch's seeded codes, alone, batched and joined late.

Only the engine thread may touch a StaticBatch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from batching import sampling
from batching.running import FinishedRow, StepOutput, row_seed

COLUMN_BLOCK = 64  # attention width is rounded up to a multiple of this (few distinct shapes: graph buckets)
FIRST_SLOTS = 8
FIRST_COLUMNS = 256


def _round_up(n: int, block: int) -> int:
    return max(block, -(-n // block) * block)


def slot_bucket(n: int) -> int:
    """Slots a step runs over for `n` (one past the highest slot in use): the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


class StaticBatch:
    def __init__(self, engine, *, keep_buffers: bool = False):
        self.engine = engine
        self.keep_buffers = keep_buffers  # keep the buffers when the batch drains (captured graphs point at them)
        self.slot_keys: list = []  # slot -> key, None when free
        self.segments: list = []  # slot -> Segment, None when free
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (keys, values) [slots, heads, cols, dim]
        self.t: dict[str, torch.Tensor] = {}  # per-slot state, dim 0 = slot
        self.lengths: list[int] = []  # host copy of t["length"]: the KV positions each slot holds
        self.generation = 0  # bumped whenever the buffers are reallocated (graphs captured before are stale)

    # ---------------------------------------------------------------- size

    @property
    def keys(self) -> list:
        return [k for k in self.slot_keys if k is not None]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_slots(self) -> int:
        """One past the highest slot in use: the rows a step runs over, before bucketing."""
        return max((i + 1 for i, k in enumerate(self.slot_keys) if k is not None), default=0)

    @property
    def width(self) -> int:
        """Attention columns of the next step: the longest row after its write, rounded up to COLUMN_BLOCK."""
        used = [n for n, k in zip(self.lengths, self.slot_keys, strict=True) if k is not None]
        return _round_up(max(used) + 1, COLUMN_BLOCK) if used else 0

    @property
    def max_columns(self) -> int:
        """The most KV columns a slot can need: the engine's longest row, in whole blocks."""
        return _round_up(self.engine.max_row_positions, COLUMN_BLOCK)

    @property
    def kv_shape(self) -> tuple[int, ...] | None:
        """The shape one layer's attention reads at the next step: (slots, heads, columns, head_dim)."""
        if not len(self):
            return None
        _, heads, _, dim = self.kv[0][0].shape
        return (self.n_slots, heads, self.width, dim)

    @property
    def kv_positions(self) -> int:
        shape = self.kv_shape
        return 0 if shape is None else shape[0] * shape[2]

    # ---------------------------------------------------------------- buffers

    def _allocate(self, slots: int, columns: int, like: torch.Tensor, width: int, t_max: int) -> None:
        """(Re)allocate every buffer for at least `slots` slots and `columns` KV columns, keeping what is there."""
        e = self.engine
        dev = e.device
        old_slots = len(self.slot_keys)
        old_cols = self.kv[0][0].shape[2] if self.kv else 0
        # Growth doubles, so a batch that keeps growing reallocates only a few times.
        slots = max(slots, FIRST_SLOTS, 2 * old_slots if slots > old_slots else old_slots)
        columns = max(columns, FIRST_COLUMNS, 2 * old_cols if columns > old_cols else old_cols)
        columns = min(columns, self.max_columns)
        t_max = max(t_max, self.t["codes"].shape[1] if self.t else 0)
        if slots == old_slots and columns == old_cols and self.t and t_max == self.t["codes"].shape[1]:
            return
        _, heads, _, dim = like.shape
        kv = []
        for layer in range(e.model.gpt.gpt.config.n_layer):
            pair = []
            for old in (self.kv[layer] if self.kv else (None, None)):
                new = torch.zeros(slots, heads, columns, dim, dtype=like.dtype, device=dev)
                if old is not None:
                    new[:old_slots, :, :old_cols] = old
                pair.append(new)
            kv.append(tuple(pair))
        fields = {
            "active": (torch.long, ()), "pos": (torch.long, ()), "next_tok": (torch.long, ()), "length": (torch.long, ()),
            "min_new": (torch.long, ()), "max_new": (torch.long, ()), "temperature": (torch.float32, ()),
            "top_k": (torch.long, ()), "top_p": (torch.float32, ()), "penalty": (torch.float32, ()),
            "sample": (torch.bool, ()), "seen": (torch.bool, (e.n_audio,)), "uniforms": (torch.float64, (t_max,)),
            "codes": (torch.long, (t_max,)), "hidden": (torch.float32, (t_max, width)),
        }  # fmt: skip
        t = {}
        for name, (dtype, tail) in fields.items():
            new = torch.zeros(slots, *tail, dtype=dtype, device=dev)
            if name in ("temperature", "top_p", "penalty", "top_k"):
                new.fill_(1)  # free slots sample harmlessly (no division by zero, no empty top-k)
            if name in self.t:
                old = self.t[name]
                new[tuple(slice(0, s) for s in old.shape)] = old
            t[name] = new
        self.kv, self.t = kv, t
        self.slot_keys += [None] * (slots - old_slots)
        self.segments += [None] * (slots - old_slots)
        self.lengths += [0] * (slots - old_slots)
        self.generation += 1

    # ---------------------------------------------------------------- admit

    def admit(self, keys: Sequence, segments: Sequence) -> None:
        if len(keys) != len(segments):
            raise ValueError(f"admit takes one key per segment, got {len(keys)} keys for {len(segments)} segments")
        if not segments:
            return
        if set(keys) & set(self.keys) or len(set(keys)) != len(keys):
            raise ValueError("a row key is already running")
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

        limits = [e.row_limits(s) for s in segments]
        free = [i for i, k in enumerate(self.slot_keys) if k is None]
        needed = len(self.slot_keys) + max(0, b - len(free))
        longest = max(len(p) + hi for p, (_, hi) in zip(prefixes, limits, strict=True))
        self._allocate(needed, _round_up(longest + 1, COLUMN_BLOCK), cache.layers[0].keys, width,
                       max(hi for _, hi in limits))  # fmt: skip
        slots = [i for i, k in enumerate(self.slot_keys) if k is None][:b]
        for i, (slot, p) in enumerate(zip(slots, prefixes, strict=True)):
            n = p.shape[0]
            for (k_buf, v_buf), layer in zip(self.kv, cache.layers, strict=True):
                k_buf[slot, :, :n] = layer.keys[i, :, p_max - n :]
                v_buf[slot, :, :n] = layer.values[i, :, p_max - n :]
            self._set_row(slot, segments[i], limits[i], n)
            self.slot_keys[slot] = keys[i]
            self.segments[slot] = segments[i]
            self.lengths[slot] = n

    def _set_row(self, slot: int, segment, limits: tuple[int, int], length: int) -> None:
        e, t, p = self.engine, self.t, segment.params
        lo, hi = limits
        t["active"][slot] = 1
        t["pos"][slot] = 0
        t["next_tok"][slot] = e.start_audio
        t["length"][slot] = length
        t["min_new"][slot], t["max_new"][slot] = lo, hi
        t["temperature"][slot] = max(p.temperature, 1e-5)
        t["top_k"][slot] = min(max(p.top_k, 1), e.n_audio)
        t["top_p"][slot] = p.top_p
        t["penalty"][slot] = p.repetition_penalty
        t["sample"][slot] = p.do_sample
        # Stock XTTS's input_ids hold its dummy prefix ids (1) and the start token, which the repetition penalty
        # sees too (as RunningBatch keeps it).
        t["seen"][slot] = False
        t["seen"][slot, 1] = True
        t["seen"][slot, e.start_audio] = True
        # The row's own stream (RunningBatch's): the same seed gives the same draws in any slot and batch.
        t["uniforms"][slot] = 0
        t["uniforms"][slot, :hi] = torch.rand(hi, generator=torch.Generator().manual_seed(row_seed(p.seed)),
                                              dtype=torch.float64).to(e.device)  # fmt: skip
        t["codes"][slot] = -1

    # ---------------------------------------------------------------- step

    def forward(self, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoding step's arithmetic on slots [0, n) and columns [0, width): writes each slot's new key and
        value at its own length, returns (final hidden states [n, model width] float32, logits [n, audio codes]).
        Reads and writes only the buffers: the part a CUDA graph captures."""
        e, t = self.engine, self.t
        gpt = e.model.gpt
        core = gpt.gpt
        rows = torch.arange(n, device=e.device)
        write = t["length"][:n]
        pos = t["pos"][:n]
        cols = torch.arange(width, device=e.device)
        mask = (cols[None, :] <= write[:, None])[:, None, None, :]  # [n, 1, 1, width]
        with e.autocast():
            h = (gpt.mel_embedding(t["next_tok"][:n]) + gpt.mel_pos_embedding.emb.weight[pos])[:, None, :]
            for block, (k_buf, v_buf) in zip(core.h, self.kv, strict=True):
                attn = block.attn
                q, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
                q = q.view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
                k_buf[rows, :, write] = k.view(n, attn.num_heads, attn.head_dim).to(k_buf.dtype)
                v_buf[rows, :, write] = v.view(n, attn.num_heads, attn.head_dim).to(v_buf.dtype)
                o = F.scaled_dot_product_attention(q, k_buf[:n, :, :width].to(q.dtype), v_buf[:n, :, :width].to(q.dtype),
                                                   attn_mask=mask, scale=attn.scaling)  # fmt: skip
                h = h + attn.c_proj(o.transpose(1, 2).reshape(n, 1, -1))
                h = h + block.mlp(block.ln_2(h))
            h = gpt.final_norm(core.ln_f(h)[:, -1]).float()
            logits = gpt.mel_head(h).float()
        return h, logits

    def sample(self, n: int, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """RunningBatch's sampling on slots [0, n): the repetition penalty, the minimum length, greedy or the
        row's own draw; records the token and its hidden state, and advances the slots in use (free ones stay at
        column 0: they compute, harmlessly, and write nothing that a row reads)."""
        e, t = self.engine, self.t
        rows = torch.arange(n, device=e.device)
        pos = t["pos"][:n]
        t["hidden"][rows, pos] = h
        pen = t["penalty"][:n, None]
        seen = t["seen"][:n]
        logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
        logits[:, e.stop_audio] = logits[:, e.stop_audio].masked_fill(pos < t["min_new"][:n], -math.inf)
        greedy = logits.argmax(-1)
        sampled = sampling.sample(logits, t["temperature"][:n, None], t["top_k"][:n, None], t["top_p"][:n, None],
                                  t["uniforms"][rows, pos])  # fmt: skip
        tok = torch.where(t["sample"][:n], sampled, greedy)
        t["codes"][rows, pos] = tok
        seen[rows, tok] = True
        active = t["active"][:n]
        t["pos"][:n] += active
        t["length"][:n] += active
        t["next_tok"][:n] = tok
        return tok

    def step(self, run=None) -> StepOutput:
        """One token for every running row. `run(n, width)` does forward + sample (a captured graph's replay, or
        the eager default) and returns the tokens of slots [0, n)."""
        n_used = self.n_slots
        if not n_used:
            return StepOutput((), (), [])
        # Eager steps run over exactly the slots in use; a graph's replay over its bucket (free slots included).
        # Graph buckets are powers of two, of slots and of columns (capped at what the buffers can hold).
        n = n_used if run is None else min(slot_bucket(n_used), len(self.slot_keys))
        width = self.width if run is None else min(slot_bucket(self.width), self.max_columns)
        self._ensure_columns(width)
        tok = (run or self.eager)(n, width)
        for i in range(n_used):
            if self.slot_keys[i] is not None:
                self.lengths[i] += 1
        tokens = tok.tolist()
        t = self.t
        pos = t["pos"][:n].tolist()
        max_new = t["max_new"][:n].tolist()
        keys, codes, finished = [], [], []
        for slot in range(n_used):
            key = self.slot_keys[slot]
            if key is None:
                continue
            keys.append(key)
            codes.append(tokens[slot])
            if tokens[slot] == self.engine.stop_audio or pos[slot] >= max_new[slot]:
                m = pos[slot]
                # Copies: the slot's buffers are written again once it is free (on a CPU, .cpu() is no copy).
                finished.append(FinishedRow(key, self.segments[slot], t["codes"][slot, :m].cpu().numpy().copy(),
                                            t["hidden"][slot, :m].clone()))  # fmt: skip
                self._free(slot)
        self._drained()
        return StepOutput(tuple(keys), tuple(codes), finished)

    def eager(self, n: int, width: int) -> torch.Tensor:
        h, logits = self.forward(n, width)
        return self.sample(n, h, logits)

    def _ensure_columns(self, width: int) -> None:
        if width > self.kv[0][0].shape[2]:
            self._allocate(len(self.slot_keys), width, self.kv[0][0], self.t["hidden"].shape[2],
                           self.t["codes"].shape[1])  # fmt: skip

    def latents(self, key) -> torch.Tensor:
        """[tokens so far, width]: the vocoder latents of a running row (a view into the batch's buffer)."""
        slot = self.slot_keys.index(key)
        return self.t["hidden"][slot, : int(self.t["pos"][slot])]

    # ---------------------------------------------------------------- leave

    def _free(self, slot: int) -> None:
        self.slot_keys[slot] = None
        self.segments[slot] = None
        self.lengths[slot] = 0
        for name in ("active", "length", "pos"):
            self.t[name][slot] = 0

    def _drained(self) -> None:
        if not len(self) and not self.keep_buffers:
            self.reset()

    def evict(self, keys) -> list:
        """Free these rows' slots (keys not running are ignored); returns the keys dropped. Nothing is copied."""
        gone = set(keys)
        dropped = [k for k in self.keys if k in gone]
        for slot, k in enumerate(self.slot_keys):
            if k is not None and k in gone:
                self._free(slot)
        self._drained()
        return dropped

    def reset(self) -> None:
        if self.keep_buffers and self.kv:
            for slot in range(len(self.slot_keys)):
                self._free(slot)
            return
        self.slot_keys, self.segments, self.lengths = [], [], []
        self.kv, self.t = [], {}
        self.generation += 1
