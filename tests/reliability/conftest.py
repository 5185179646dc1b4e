"""The storage tests' emulator and throwaway service account, shared with the reliability tests."""

from tests.storage.conftest import emulator, service_account  # noqa: F401  (pytest fixtures)
