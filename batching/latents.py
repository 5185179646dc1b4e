"""The speaker-latent cache: conditioning is computed once per voice key, kept in memory and on disk.

The key is the caller's voice key (the reference audio's content hash, so a new reference means a new key),
combined with the model's fingerprint on disk, so latents of another checkpoint are never reused.

- memory: an LRU of `capacity` entries;
- disk: one small file per voice (`{model}-{key}.pt`, written atomically), at most `disk_max_entries` files,
  least recently used removed first, so a restarted worker skips conditioning for the voices it knew;
- single-flight: when 16 jobs of a new voice arrive together, one computes and 15 wait for it; a failure is
  handed to all of them, and the next request tries again.
- the disk is an optimisation, never a reason to fail a job: every error reading, touching, writing or pruning
  the files (full disk, a file another thread or worker deleted mid-way, a foreign file) is logged as a warning
  and degrades to a miss or a skipped save. Saves write a uniquely named temp file, so concurrent saves (threads
  of one worker, or workers sharing the folder) never collide.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
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
        """The latents on disk, or None (missing, unreadable, vanished mid-read): never raises."""
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
        try:
            os.utime(path)  # a read is a use
        except OSError as exc:  # pruned by another save meanwhile: the latents we read are still good
            log.warning("could not mark latent file %s as used: %s", path.name, exc)
        return latents

    def _save(self, key: str, latents: VoiceLatents) -> None:
        """Persist the latents and prune the folder; never raises (the latents are in memory either way)."""
        if not self.folder:
            return
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            data = {"gpt_cond_latent": latents.gpt_cond_latent.cpu(),
                    "speaker_embedding": latents.speaker_embedding.cpu()}
            torch.save(data, tmp)
            tmp.replace(path)
        except Exception as exc:  # a full disk must not fail the job: the latents are in memory
            log.warning("could not persist latents for %s: %s", key, exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return
        try:
            self._prune()
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
            log.warning("could not prune the latent cache folder: %s", exc)

    def _prune(self) -> None:
        """Keep the `disk_max_entries` most recently used files. Files other threads or workers delete while we
        look are skipped."""
        assert self.folder is not None
        stamped = []
        for file in self.folder.glob("*.pt"):
            try:
                stamped.append((file.stat().st_mtime_ns, file))
            except OSError:
                continue  # gone already
        stamped.sort(key=lambda item: item[0])
        for _, old in stamped[: max(0, len(stamped) - self.disk_max_entries)]:
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove latent file %s: %s", old.name, exc)
