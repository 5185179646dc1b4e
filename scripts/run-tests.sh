#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs (scripts/setup.sh), then runs pytest.
# Extra arguments go to pytest (e.g. `scripts/run-tests.sh -k engine -x`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
