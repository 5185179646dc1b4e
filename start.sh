#!/usr/bin/env bash
# Container entrypoint: optionally refresh the worker's code from a git repository, then `python -m server "$@"`.
#
# Without GITHUB_REPO_URL it runs the code baked into the image (APP_DIR). With it:
#   1. fetch the repository into a git cache (CODE_DIR/repo.git), each network step under a time limit; a
#      user:token in an https URL is handed to git by a credential helper from the environment, never written to
#      disk (the cache's config holds the URL without it);
#   2. resolve GITHUB_REF, a full 40-hex commit sha, as a commit object only (a branch or tag that happens to be
#      named like the sha cannot shadow it). Branches, tags, short shas and an unset GITHUB_REF (the remote's
#      default branch) are refused unless CODE_REFRESH_ALLOW_UNPINNED=true, and then logged as a warning;
#   3. export that commit into a fresh temporary folder, check it is this project (server/__main__.py), and
#      rename it into place as CODE_DIR/trees/<sha>: a rename is atomic, so a tree is complete or absent;
#   4. when it has requirements.lock (else requirements.txt), check it: every requirement carries a
#      --hash=sha256:..., and no line holds any other option (--index-url, --extra-index-url, -f, --trusted-host,
#      -e, -r, -c, ...) nor a ${VARIABLE}; then install it ONCE per content with
#      `pip install --require-hashes --only-binary=:all:` into an overlay environment CODE_DIR/envs/<hash> that
#      sees the image's packages beneath it. pip runs with an environment reduced to an allow-list (PATH, HOME,
#      locale, TMPDIR, proxies, CA bundles, PIP_*): the worker's secrets (GCS_CREDENTIALS, API keys, ...) never
#      reach it. The image's own environment is never modified, and an environment counts only once its
#      .complete stamp is written;
#   5. check the code imports, then exec `python -m server "$@"` from that tree.
# Any failure or refusal in 1-5 is logged with its reason and the baked code runs instead: a bad push or an
# unreachable repository never becomes a crash loop. CODE_DIR belongs to one container (do not share it between
# workers).
#
# Settings (environment):
#   GITHUB_REPO_URL  repository to run (https://, ssh:// or file://)          [unset: run the baked code]
#   GITHUB_REF       full 40-hex commit sha to run                             [required]
#   CODE_REFRESH_ALLOW_UNPINNED  true: GITHUB_REF may also be a branch, tag or short sha, or unset (the remote's
#                    default branch): whoever can push to that branch then runs code in the worker   [false]
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
ALLOW_UNPINNED="${CODE_REFRESH_ALLOW_UNPINNED:-false}"
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

# Credentials of an http(s) URL: GIT_URL is the URL without them, GIT_USER and GIT_PASS what it carried
# (percent-decoded). They reach git only through the credential helper below, from the environment of one git
# command: never a command line, the cache's config or FETCH_HEAD.
GIT_URL=""
GIT_USER=""
GIT_PASS=""
split_url() {
  local url="$1" userinfo
  GIT_URL="$url"
  GIT_USER=""
  GIT_PASS=""
  if [[ "$url" =~ ^(https?://)([^/@]*)@(.*)$ ]]; then
    GIT_URL="${BASH_REMATCH[1]}${BASH_REMATCH[3]}"
    userinfo="${BASH_REMATCH[2]}"
    GIT_USER="$(percent_decode "${userinfo%%:*}")"
    if [[ "$userinfo" == *:* ]]; then
      GIT_PASS="$(percent_decode "${userinfo#*:}")"
    fi
  fi
}

percent_decode() { printf '%b' "${1//%/\\x}"; }

# git, with the credentials (if any) from the environment: the helper prints them for `get` and ignores `store`
# and `erase`, so nothing is saved. `credential.helper=` first drops any helper configured elsewhere.
# shellcheck disable=SC2016 # the helper is expanded by git's shell, not here
CREDENTIAL_HELPER='!f() { test "$1" = get || return 0; printf "username=%s\npassword=%s\n" "$START_SH_GIT_USER" "$START_SH_GIT_PASS"; }; f'
git_net() {
  local cache="$1"
  shift
  if [ -n "$GIT_USER$GIT_PASS" ]; then
    START_SH_GIT_USER="$GIT_USER" START_SH_GIT_PASS="$GIT_PASS" with_timeout "$GIT_TIMEOUT_S" \
      git -c credential.helper= -c "credential.helper=$CREDENTIAL_HELPER" --git-dir="$cache" "$@"
  else
    with_timeout "$GIT_TIMEOUT_S" git --git-dir="$cache" "$@"
  fi
}

# Fetch the remote's branches and tags into the bare cache (made afresh when missing, broken, or of another URL).
fetch_cache() {
  local cache="$1" url="$2"
  if ! git --git-dir="$cache" rev-parse --git-dir >/dev/null 2>&1 ||
    [ "$(git --git-dir="$cache" config --get remote.origin.url 2>/dev/null)" != "$url" ]; then
    rm -rf "$cache"
    git init --quiet --bare "$cache" || return 1
    git --git-dir="$cache" config remote.origin.url "$url" || return 1
  fi
  git_net "$cache" fetch --quiet --prune --force --tags origin '+refs/heads/*:refs/remotes/origin/*' || return 1
  rm -f "$cache/FETCH_HEAD"
}

# Print SHA (a full commit sha) when the cache holds it as a commit, fetching it by id when no branch holds it.
# SHA is only ever read as an object id: `git rev-parse` takes 40 hex digits as an id before any ref name, and the
# result must be that very commit (not, say, the commit a tag object of that id points to).
resolve_sha() {
  local cache="$1" sha="$2" found
  if ! found="$(git --git-dir="$cache" rev-parse --verify --quiet "$sha^{commit}" 2>/dev/null)"; then
    git_net "$cache" fetch --quiet origin "$sha" 2>/dev/null || return 1
    rm -f "$cache/FETCH_HEAD"
    found="$(git --git-dir="$cache" rev-parse --verify --quiet "$sha^{commit}" 2>/dev/null)" || return 1
  fi
  [ "$found" = "$sha" ] || return 1
  printf '%s\n' "$sha"
}

# Unpinned (CODE_REFRESH_ALLOW_UNPINNED=true only): print the commit that branch, tag or short sha REF names.
resolve_ref() {
  local cache="$1" ref="$2" candidate
  for candidate in "refs/remotes/origin/$ref" "refs/tags/$ref" "$ref"; do
    if git --git-dir="$cache" rev-parse --verify --quiet "$candidate^{commit}" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

# Check requirements file REQ before pip sees it: each requirement pinned by --hash=sha256:..., no other option
# anywhere (an index, a find-links folder, an editable, an include, a trusted host: the fetched file must not
# choose where packages come from), no ${VARIABLE} (pip would expand it from its environment). Prints why not.
check_requirements() {
  "$PYTHON_BIN" - "$1" <<'PY'
import re, sys

text = open(sys.argv[1], encoding="utf-8").read()
problems = []
if "${" in text:
    problems.append("it refers to an environment variable (${...})")
for line in re.sub(r"\\\r?\n", " ", text).splitlines():
    line = re.sub(r"(^|\s)#.*", "", line).strip()
    if not line:
        continue
    tokens = line.split()
    if tokens[0].startswith("-"):
        problems.append(f"it has an option line ({tokens[0].split('=')[0]})")
        continue
    others = [t.split("=")[0] for t in tokens if t.startswith("-") and not re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", t)]
    if others:
        problems.append(f"{tokens[0]} has options other than --hash=sha256: ({', '.join(others)})")
    elif not any(t.startswith("--hash=") for t in tokens):
        problems.append(f"{tokens[0]} has no --hash=sha256:")
if problems:
    print("; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    sys.exit(1)
PY
}

# The environment pip runs with: an allow-list, so the worker's secrets never reach it or what it runs.
pip_env() {
  local name
  PIP_ENV=()
  for name in PATH HOME USER LANG LC_ALL LC_CTYPE TMPDIR http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY \
    NO_PROXY SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE $(compgen -e | grep '^PIP_' || true); do
    if [ -n "${!name+set}" ]; then
      PIP_ENV+=("$name=${!name}")
    fi
  done
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
  pip_env
  (cd "$tree" && with_timeout "$PIP_TIMEOUT_S" env -i "${PIP_ENV[@]}" "$envdir/bin/python" -m pip install \
    --no-input --disable-pip-version-check --no-warn-script-location --require-hashes --only-binary=:all: \
    -r "$req" >&2)
}

# Sets RUN_DIR, RUN_PYTHON and RUN_COMMIT, or logs why not and returns 1.
# (Called from `if`, where bash ignores `set -e`: every step checks its own status.)
refresh() {
  local url shown cache ref pinned sha tree incoming req name key envdir py why
  split_url "$GITHUB_REPO_URL"
  url="$GIT_URL"
  shown="$(safe_url "$url")"
  if ! command -v git >/dev/null 2>&1; then
    log "git is not installed"
    return 1
  fi
  ref="${GITHUB_REF:-}"
  ref="${ref#refs/heads/}"
  if [[ "$ref" == -* ]]; then
    log "GITHUB_REF must not start with '-', got '$ref'"
    return 1
  fi
  pinned=""
  if [[ "$ref" =~ ^[0-9a-fA-F]{40}$ ]]; then
    pinned="$(printf '%s' "$ref" | tr 'A-F' 'a-f')"
  elif [ "$ALLOW_UNPINNED" != "true" ]; then
    log "GITHUB_REF must be a full 40-hex commit sha, got '${ref:-(unset)}': a branch, tag or short sha runs" \
      "whatever is pushed there next (set CODE_REFRESH_ALLOW_UNPINNED=true to accept that)"
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

  if [ -n "$pinned" ]; then
    if ! sha="$(resolve_sha "$cache" "$pinned")" || [ -z "$sha" ]; then
      log "GITHUB_REF $pinned is not a commit of $shown"
      return 1
    fi
  else
    if [ -z "$ref" ]; then
      ref="$(git_net "$cache" ls-remote --symref origin HEAD 2>/dev/null |
        awk '$1 == "ref:" && $3 == "HEAD" { sub("^refs/heads/", "", $2); print $2; exit }')" || ref=""
      if [ -z "$ref" ]; then
        log "cannot find the default branch of $shown; set GITHUB_REF"
        return 1
      fi
    fi
    if ! sha="$(resolve_ref "$cache" "$ref")" || [ -z "$sha" ]; then
      log "GITHUB_REF '$ref' names no branch, tag or commit of $shown"
      return 1
    fi
    log "WARNING: running unpinned code (CODE_REFRESH_ALLOW_UNPINNED=true): '$ref' is now $sha; whoever can" \
      "push to it decides what runs next to this worker's credentials"
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
    if ! why="$(check_requirements "$req")"; then
      log "${req##*/} of commit $sha refused: ${why:-it cannot be read}"
      return 1
    fi
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
