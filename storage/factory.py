"""`open_storage(config)`: build the configured backend (GCS or the local folder) and prove it is usable.

A module of its own, above `backend.py`, `gcs.py` and `local.py`: the backends import the interface
(`storage.backend`), and only this module imports the backends, so the imports form no cycle.
"""

from __future__ import annotations

import aiohttp

from .backend import Storage
from .config import StorageConfig


async def open_storage(config: StorageConfig, session: aiohttp.ClientSession | None = None) -> Storage:
    """Build the configured backend and, if `config.check_on_start`, prove the bucket is usable.

    Pass `session` to share an aiohttp session you own (it is not closed by `Storage.close`)."""
    # Imported when needed: the GCS client library loads only where GCS is configured.
    if config.backend == "gcs":
        from .gcs import GcsStorage

        storage: Storage = GcsStorage(config, session)
    else:
        from .local import LocalStorage

        storage = LocalStorage(config, session)
    if config.check_on_start:
        try:
            await storage.check()
        except BaseException:
            await storage.close()
            raise
    return storage
