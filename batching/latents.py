"""The speaker-latent cache: conditioning is computed once per voice key, kept in memory and on disk.

The key is the caller's voice key (the reference audio's content hash, so a new reference means a new key),
combined with the model's fingerprint on disk, so latents of another checkpoint are never reused.

- memory: an LRU of `capacity` entries;
- disk: one small file per voice (`{model}-{key}.pt`, written atomically), at most `disk_max_entries` files,
  least recently used removed first, so a restarted worker skips conditioning for the voices it knew;
- single-flight: when 16 jobs of a new voice arrive together, one computes and 15 wait for it; a failure is
  handed to all of them, and the next request tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from batching.engine import VoiceLatents

log = logging.getLogger(__name__)
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A short id of a checkpoint folder: its config, and its weights file's size and modification time."""
    folder = Path(model_dir)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    stat = (folder / "model.pth").stat()
    h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class LatentCache:
    def __init__(
        self,
        capacity: int,
        folder: str | os.PathLike | None,
        model_id: str,
        *,
        disk_max_entries: int = 2000,
        enabled: bool = True,
    ):
        if capacity < 1:
            raise ValueError(f"LATENT_CACHE_SIZE must be an integer >= 1, got {capacity}")
        self.capacity = capacity
        self.folder = Path(folder) if folder else None
        self.model_id = model_id
        self.disk_max_entries = disk_max_entries
        # Disabled: the seed's behaviour (conditioning recomputed for every request), for baselines.
        self.enabled = enabled
        self._memory: OrderedDict[str, VoiceLatents] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.hits = 0  # served from memory or disk
        self.disk_hits = 0
        self.misses = 0  # computed
        if self.folder and enabled:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._memory)

    async def get(self, key: str, compute: Callable[[], Awaitable[VoiceLatents]]) -> tuple[VoiceLatents, bool]:
        """The latents of `key` and whether they were cached; `compute()` runs at most once at a time per key."""
        if not _SAFE_KEY.match(key):
            raise ValueError(f"latent cache key must match {_SAFE_KEY.pattern}, got {key!r}")
        if not self.enabled:
            self.misses += 1
            return await compute(), False
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key], True
        task = self._inflight.get(key)
        if task is None:
            # A task of its own: a caller that goes away does not cancel the work the others wait for.
            task = asyncio.ensure_future(self._fill(key, compute))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
            first = True
        else:
            first = False
        latents, from_disk = await asyncio.shield(task)
        hit = from_disk or not first
        if hit:
            self.hits += 1
        return latents, hit

    async def _fill(self, key: str, compute: Callable[[], Awaitable[VoiceLatents]]) -> tuple[VoiceLatents, bool]:
        latents = await asyncio.to_thread(self._load, key)
        from_disk = latents is not None
        if from_disk:
            self.disk_hits += 1
        else:
            self.misses += 1
            latents = await compute()
            await asyncio.to_thread(self._save, key, latents)
        self._remember(key, latents)
        return latents, from_disk

    def _remember(self, key: str, latents: VoiceLatents) -> None:
        self._memory[key] = latents
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.model_id}-{key}.pt"

    def _load(self, key: str) -> VoiceLatents | None:
        if not self.folder:
            return None
        path = self._path(key)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            latents = VoiceLatents(data["gpt_cond_latent"], data["speaker_embedding"])
        except FileNotFoundError:
            return None
        except Exception as exc:  # a truncated or foreign file: recompute, and replace it
            log.warning("ignoring unreadable latent file %s: %s", path.name, exc)
            return None
        os.utime(path)  # a read is a use
        return latents

    def _save(self, key: str, latents: VoiceLatents) -> None:
        if not self.folder:
            return
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        data = {"gpt_cond_latent": latents.gpt_cond_latent.cpu(), "speaker_embedding": latents.speaker_embedding.cpu()}
        try:
            torch.save(data, tmp)
            tmp.replace(path)
        except OSError as exc:  # a full disk must not fail the job: the latents are in memory
            log.warning("could not persist latents for %s: %s", key, exc)
            tmp.unlink(missing_ok=True)
            return
        files = sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
        for old in files[: max(0, len(files) - self.disk_max_entries)]:
            old.unlink(missing_ok=True)
