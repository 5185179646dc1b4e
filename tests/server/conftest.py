"""Fixtures the tests of server/ share: `world` (testing/handler_world.py: real local storage with the seed's
reference voice, a reference cache, metrics, and a handler built on them for a given scheduler)."""

from testing.handler_world import world  # noqa: F401  (a fixture, found by name)
