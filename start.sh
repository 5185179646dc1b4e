#!/usr/bin/env bash
# Container entrypoint: optionally refresh the worker's code from a git repository, then `python -m server "$@"`.
#
# Without GITHUB_REPO_URL it runs the code baked into the image (APP_DIR). With it:
#   1. fetch the repository into a git cache (CODE_DIR/repo.git), each network step under a time limit;
#   2. resolve GITHUB_REF (a branch, tag or commit sha; default: the remote's default branch) to one commit;
#   3. export that commit into a fresh temporary folder, check it is this project (server/__main__.py), and
#      rename it into place as CODE_DIR/trees/<sha>: a rename is atomic, so a tree is complete or absent;
#   4. when it has requirements.lock (else requirements.txt), install them ONCE per content into an overlay
#      environment CODE_DIR/envs/<hash> that sees the image's packages beneath it; the image's own environment
#      is never modified, and an environment counts only once its .complete stamp is written;
#   5. check the code imports, then exec `python -m server "$@"` from that tree.
# Any failure in 1-5 is logged with its reason and the baked code runs instead: a bad push or an unreachable
# repository never becomes a crash loop. CODE_DIR belongs to one container (do not share it between workers).
#
# Settings (environment):
#   GITHUB_REPO_URL  repository to run (https://, ssh:// or file://)          [unset: run the baked code]
#   GITHUB_REF       branch, tag or full commit sha to run                     [the remote's default branch]
#   APP_DIR          the code baked into the image                             [/app]
#   CODE_DIR         fetched code, its git cache and environments              [/workspace/code]
#   PYTHON_BIN       the Python that runs the worker                           [python3]
#   GIT_TIMEOUT_S    time limit of each git network operation, seconds         [120]
#   PIP_TIMEOUT_S    time limit of installing the requirements, seconds        [1200]
# The worker sees CODE_SOURCE (baked | fetched) and, for fetched code, CODE_COMMIT.
set -euo pipefail

APP_DIR="${APP_DIR:-/app}"
CODE_DIR="${CODE_DIR:-/workspace/code}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
GIT_TIMEOUT_S="${GIT_TIMEOUT_S:-120}"
PIP_TIMEOUT_S="${PIP_TIMEOUT_S:-1200}"
# A private repository without credentials must fail, not wait for a password on a terminal nobody reads.
export GIT_TERMINAL_PROMPT=0

log() { printf '[start.sh] %s\n' "$*" >&2; }

# The URL without user:password@ (a token in an https URL must not reach the logs).
safe_url() { printf '%s' "$1" | sed -E 's#(://)[^/@]*@#\1#'; }

with_timeout() {
  local seconds="$1"
  shift
  if command -v timeout >/dev/null 2>&1; then
    timeout "$seconds" "$@"
  else
    "$@"
  fi
}

run_baked() {
  log "running the code baked into the image ($APP_DIR)"
  cd "$APP_DIR"
  export CODE_SOURCE=baked
  exec "$PYTHON_BIN" -m server "$@"
}

# Fetch the remote's branches and tags into the bare cache (made afresh when missing or broken).
fetch_cache() {
  local cache="$1" url="$2"
  if ! git --git-dir="$cache" rev-parse --git-dir >/dev/null 2>&1; then
    rm -rf "$cache"
    git init --quiet --bare "$cache" || return 1
  fi
  git --git-dir="$cache" config remote.origin.url "$url" || return 1
  with_timeout "$GIT_TIMEOUT_S" git --git-dir="$cache" fetch --quiet --prune --force --tags origin \
    '+refs/heads/*:refs/remotes/origin/*'
}

# Print the commit sha that REF names in the cache, fetching a bare sha directly when no branch holds it.
resolve_ref() {
  local cache="$1" ref="$2" candidate
  for candidate in "refs/remotes/origin/$ref" "refs/tags/$ref" "$ref"; do
    if git --git-dir="$cache" rev-parse --verify --quiet "$candidate^{commit}" 2>/dev/null; then
      return 0
    fi
  done
  if [[ "$ref" =~ ^[0-9a-f]{40}$ ]] &&
    with_timeout "$GIT_TIMEOUT_S" git --git-dir="$cache" fetch --quiet origin "$ref" 2>/dev/null; then
    git --git-dir="$cache" rev-parse --verify --quiet "$ref^{commit}"
    return
  fi
  return 1
}

# Build the overlay environment ENVDIR for requirements file REQ (run from TREE, for relative paths in REQ).
make_env() {
  local envdir="$1" req="$2" tree="$3" site
  "$PYTHON_BIN" -m venv --without-pip "$envdir" || return 1
  site="$("$envdir/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || return 1
  # The image's packages stay importable beneath the overlay (the overlay's own site-packages come first).
  "$PYTHON_BIN" -c 'import site
print("import site; " + "; ".join("site.addsitedir(%r)" % p for p in site.getsitepackages()))' \
    >"$site/_image_packages.pth" || return 1
  (cd "$tree" && with_timeout "$PIP_TIMEOUT_S" "$envdir/bin/python" -m pip install --no-input \
    --disable-pip-version-check --no-warn-script-location -r "$req" >&2)
}

# Sets RUN_DIR, RUN_PYTHON and RUN_COMMIT, or logs why not and returns 1.
# (Called from `if`, where bash ignores `set -e`: every step checks its own status.)
refresh() {
  local url shown cache ref sha tree incoming req name key envdir py
  url="$GITHUB_REPO_URL"
  shown="$(safe_url "$url")"
  if ! command -v git >/dev/null 2>&1; then
    log "git is not installed"
    return 1
  fi
  if ! mkdir -p "$CODE_DIR/trees" "$CODE_DIR/envs"; then
    log "cannot create $CODE_DIR"
    return 1
  fi
  rm -rf "$CODE_DIR"/trees/.incoming.* # left by a run that was killed half-way

  cache="$CODE_DIR/repo.git"
  log "fetching $shown"
  if ! fetch_cache "$cache" "$url"; then
    log "fetch failed; retrying once with a fresh cache"
    rm -rf "$cache"
    if ! fetch_cache "$cache" "$url"; then
      log "cannot fetch $shown (unreachable, no access, or over GIT_TIMEOUT_S=$GIT_TIMEOUT_S s)"
      return 1
    fi
  fi

  ref="${GITHUB_REF:-}"
  if [ -z "$ref" ]; then
    ref="$(with_timeout "$GIT_TIMEOUT_S" git --git-dir="$cache" ls-remote --symref origin HEAD 2>/dev/null |
      awk '$1 == "ref:" && $3 == "HEAD" { sub("^refs/heads/", "", $2); print $2; exit }')" || ref=""
    if [ -z "$ref" ]; then
      log "cannot find the default branch of $shown; set GITHUB_REF"
      return 1
    fi
  fi
  ref="${ref#refs/heads/}"
  if [[ "$ref" == -* ]]; then
    log "GITHUB_REF must not start with '-', got '$ref'"
    return 1
  fi
  if ! sha="$(resolve_ref "$cache" "$ref")" || [ -z "$sha" ]; then
    log "GITHUB_REF '$ref' names no branch, tag or commit of $shown"
    return 1
  fi

  tree="$CODE_DIR/trees/$sha"
  if [ ! -d "$tree" ]; then
    if ! incoming="$(mktemp -d "$CODE_DIR/trees/.incoming.XXXXXX")"; then
      log "cannot create a folder under $CODE_DIR/trees"
      return 1
    fi
    if ! git --git-dir="$cache" archive --format=tar "$sha" | tar -x -C "$incoming"; then
      log "cannot export commit $sha"
      rm -rf "$incoming"
      return 1
    fi
    if [ ! -f "$incoming/server/__main__.py" ]; then
      log "commit $sha of $shown has no server/__main__.py: not this project"
      rm -rf "$incoming"
      return 1
    fi
    chmod 755 "$incoming"
    if ! mv -T "$incoming" "$tree"; then
      log "cannot move the new tree into place"
      rm -rf "$incoming"
      return 1
    fi
  fi

  py="$PYTHON_BIN"
  req=""
  for name in requirements.lock requirements.txt; do
    if [ -f "$tree/$name" ]; then
      req="$tree/$name"
      break
    fi
  done
  if [ -n "$req" ]; then
    # One environment per (Python, requirements) content: unchanged requirements install nothing.
    if ! key="$({ "$PYTHON_BIN" -c 'import sys; print(sys.version)' && cat "$req"; } | sha256sum | cut -c1-16)"; then
      log "cannot hash $req"
      return 1
    fi
    envdir="$CODE_DIR/envs/$key"
    if [ -f "$envdir/.complete" ]; then
      log "requirements unchanged (${req##*/} $key): no install"
    else
      log "requirements changed: installing ${req##*/} ($key) into $envdir"
      rm -rf "$envdir"
      if ! make_env "$envdir" "$req" "$tree"; then
        log "installing ${req##*/} failed (see pip's output above)"
        rm -rf "$envdir"
        return 1
      fi
      touch "$envdir/.complete"
    fi
    py="$envdir/bin/python"
  fi

  if ! (cd "$tree" && with_timeout "$GIT_TIMEOUT_S" "$py" -c 'import server'); then
    log "the code at $sha does not import (import server failed)"
    return 1
  fi

  # Keep only what this run uses (CODE_DIR is this container's own).
  find "$CODE_DIR/trees" -mindepth 1 -maxdepth 1 ! -name "$sha" -exec rm -rf {} + 2>/dev/null || true
  if [ -n "$req" ]; then
    find "$CODE_DIR/envs" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} + 2>/dev/null || true
  fi

  RUN_DIR="$tree"
  RUN_PYTHON="$py"
  RUN_COMMIT="$sha"
  log "code refreshed: $shown at $ref ($sha)"
}

main() {
  if [ -z "${GITHUB_REPO_URL:-}" ]; then
    run_baked "$@"
  fi
  if refresh; then
    cd "$RUN_DIR"
    export CODE_SOURCE=fetched CODE_COMMIT="$RUN_COMMIT"
    log "running the fetched code ($RUN_DIR)"
    exec "$RUN_PYTHON" -m server "$@"
  fi
  log "code refresh failed: falling back to the baked code"
  run_baked "$@"
}

main "$@"
