#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs (scripts/setup.sh), then runs pytest.
# Extra arguments go to pytest (e.g. `scripts/run-tests.sh -k engine -x`).
# Test files run in TEST_PROCESSES processes side by side (pytest-xdist, --dist loadfile: a file's tests, and the
# worker processes its module fixtures start, stay in one process). Default 2: much of the suite waits on worker
# processes it started, so two streams fill two cores. TEST_PROCESSES=1 runs everything in this one process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
processes="${TEST_PROCESSES:-2}"
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "TEST_PROCESSES must be a whole number of processes, at least 1, got '$processes'" >&2
  exit 2
fi
if [ "$processes" -gt 1 ]; then
  set -- -n "$processes" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
