"""WorkerConfig built from a test's environment with a stand-in storage config (`build`), which holds a secret
(`SECRET`) that must never reach the config's repr or summary."""

from __future__ import annotations

from server.config import WorkerConfig

SECRET = "-----BEGIN PRIVATE KEY-----very-secret-----END PRIVATE KEY-----"


class FakeStorageConfig:
    """Stands in for storage.config.StorageConfig: records the env it was built from, holds a secret."""

    def __init__(self, env):
        self.env = dict(env)
        self.credentials = SECRET

    def __repr__(self) -> str:  # a careless storage repr must still not reach WorkerConfig's repr
        return f"FakeStorageConfig(credentials={self.credentials!r})"


def build(env: dict[str, str]) -> WorkerConfig:
    return WorkerConfig.from_env(env, storage_from_env=FakeStorageConfig)
