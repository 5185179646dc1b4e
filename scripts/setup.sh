#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Ubuntu machine with Python 3.11+:
#   - Debian packages: FFmpeg's shared libraries (torchcodec, used by torchaudio) and git;
#   - a virtual environment in .venv with the pinned packages of requirements-test.lock (the runtime lock,
#     requirements.lock, plus the test and bench tools) and this project, editable.
# Re-running it does nothing when nothing changed. Extras to install: SETUP_EXTRAS (default "test,bench").
# The locks carry sha256 hashes (for the Docker image's `pip install --require-hashes`); here they serve as
# constraints without them (.venv/constraints.txt): pip would otherwise refuse the editable project, which has no
# hash. The lock files are made by scripts/lock.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${SETUP_EXTRAS:-test,bench}"
python="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v git >/dev/null 2>&1 || need_apt+=(git)
# prometheus brings promtool too: tests/e2e/test_prometheus.py and tests/deploy/ (deploy/prometheus) use both.
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [[ " ${need_apt[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    # The tests start their own prometheus; Debian's service would start on install and hold port 9090
    # (METRICS_PORT's default). Masked before the install, it never starts.
    log "masking Debian's prometheus service (the tests run their own)"
    $sudo systemctl mask prometheus.service >/dev/null 2>&1 || true
  fi
  log "installing Debian packages: ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [[ " ${need_apt[*]} " == *" prometheus "* ]] && [ ! -d /run/systemd/system ]; then
    # Without systemd the package's init script may have started it (unless policy-rc.d forbade it): stop it.
    $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

stamp=.venv/.setup-stamp
want="$(cat pyproject.toml requirements.lock requirements-test.lock | sha256sum | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  log "installing pinned packages (first run: a few minutes)"
  .venv/bin/python -m pip install -q pip==26.3 # the pip the Docker image has
  # Each requirement line of the lock (`name==version ; marker \`), without its trailing backslash and hashes.
  sed -n -E 's/^([A-Za-z0-9][^#]*[^ \\])[ \\]*$/\1/p' requirements-test.lock >.venv/constraints.txt
  # torch first, on its own: pip then takes the exact build named in the lock.
  .venv/bin/python -m pip install -q -c .venv/constraints.txt torch torchaudio torchcodec
  .venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[${extras}]"
  echo "$want" > "$stamp"
fi
