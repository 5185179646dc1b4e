#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Ubuntu machine with Python 3.11+:
#   - Debian packages: FFmpeg's shared libraries (torchcodec, used by torchaudio) and git;
#   - a virtual environment in .venv with the pinned packages of requirements.lock and this project.
# Re-running it does nothing when nothing changed. Extras to install: SETUP_EXTRAS (default "test,bench").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${SETUP_EXTRAS:-test,bench}"
python="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v git >/dev/null 2>&1 || need_apt+=(git)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

stamp=.venv/.setup-stamp
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  log "installing pinned packages (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, on its own: pip then takes the exact build named in requirements.lock.
  .venv/bin/python -m pip install -q -c requirements.lock torch torchaudio torchcodec
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[${extras}]"
  echo "$want" > "$stamp"
fi
