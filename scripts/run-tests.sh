#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs (scripts/setup.sh), then runs pytest.
# Extra arguments go to pytest (e.g. `scripts/run-tests.sh -k engine -x`).
# TEST_PROCESSES > 1 runs test files in that many processes side by side (pytest-xdist, --dist loadfile: a file's
# tests, and the worker processes its module fixtures start, stay in one process). Default 1: on the 2-core CI
# machine two processes were slower (18 min 03 s of tests against 15 min 41 s in one, same clone, 2026-12-06): the
# suite is CPU-bound and each process's torch threads then compete for the same cores. More cores may gain.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
processes="${TEST_PROCESSES:-1}"
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "TEST_PROCESSES must be a whole number of processes, at least 1, got '$processes'" >&2
  exit 2
fi
if [ "$processes" -gt 1 ]; then
  set -- -n "$processes" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
