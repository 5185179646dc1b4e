#!/usr/bin/env bash
# Downloads, into .gpu-wheels/ (ignored by git), the Python 3.12 wheels that the lent GPU machine lacks for the
# engine and its benchmark (python -m bench.gpu), so that they can travel with the working tree (`run` tool,
# carry [".gpu-wheels"]); scripts/gpu-check.sh installs them there. Run it here, where PyPI is reachable:
#
#     bash scripts/gpu-wheels.sh
#
# The GPU machine (one H200, no network) has Python 3.12 with torch 2.11, torchaudio 2.11, transformers 5.17,
# tokenizers 0.23.2, huggingface-hub 1.33, numpy, scipy, numba, lazy-loader, einops, six and more (its package
# list: the device tool's KINDS.md). What it lacks, found by listing every distribution that
# `python -m bench.gpu` loads (sys.modules after a run) and removing the ones it already has:
#   coqui-tts, coqpit-config, coqui-tts-trainer  the model code (TTS, coqpit, trainer.io)
#   transformers 5.23.0       DESIGN.md: 5.24 breaks XTTS, 5.17 is unverified with coqui-tts 0.28; installed into
#                             the target folder, it shadows 5.17 (its needs: tokenizers >=0.23.1,<0.24 and
#                             huggingface-hub >=1.31: the machine's 0.23.2 and 1.33 do)
#   regex                     transformers 5.23 checks regex >= 2025.10.22 at import; the machine's version is
#                             unknown, and the wheel is small
#   librosa                   `import librosa` at the top of TTS/tts/models/xtts.py; only its lazy __init__ runs on
#                             this path (lazy-loader is there), so none of its heavy needs (audioread, pooch, soxr)
#   soundfile, cffi           TTS imports soundfile at import time; soundfile needs cffi's _cffi_backend; the
#                             manylinux wheel bundles libsndfile
#   num2words, ko-speech-tools, anyascii   imported by coqui's XTTS tokenizer and text cleaners
#   torchcodec 0.11.0         `import TTS` refuses to run under torch >= 2.9 unless torchcodec can be found (it only
#                             looks: importlib.util.find_spec); 0.11 is the release built for torch 2.11. It is
#                             loaded only by torchaudio.load, which needs FFmpeg's shared libraries too, and which
#                             bench/gpu.py avoids: it reads the seed path's reference files with soundfile
# Left out on purpose: torchaudio (2.11.0 is there, matching torch 2.11), FFmpeg, soxr (transformers imports it only
# if present), tokenizers and huggingface-hub (the machine's versions satisfy transformers 5.23), runpod,
# gcloud-aio-* and the worker's other server packages (the benchmark does not import them).
# tests/bench/test_gpu_kit.py runs the CPU dry run with every other package hidden, to keep this list complete.
# Pins are requirements.lock's, except torchcodec's (the lock's 0.17.0 is paired with its torch 2.14; torchcodec's
# own table pairs 0.11 with torch 2.11). The folder must stay under 60 MiB (the working tree plus carried paths travel
# in 64 MiB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${GPU_WHEELS_DIR:-$ROOT/.gpu-wheels}"
LIMIT_MIB=60
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  PYTHON="$(command -v python3)"
fi

WHEELS=(
  coqui-tts==0.28.0
  coqpit-config==0.2.5
  coqui-tts-trainer==0.4.0
  transformers==5.23.0
  regex==2026.11.19
  librosa==0.11.0
  soundfile==0.14.0
  cffi==2.1.1
  num2words==0.5.14
  ko-speech-tools==0.1.0
  anyascii==0.3.3
  torchcodec==0.11.0
)

# A fresh folder each time: two versions of one package would make the install there fail.
rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"

# Every wheel must install under CPython 3.12 on x86-64 Linux: pure, cp312 or abi3, manylinux x86_64.
bad=0
count=0
for whl in "$DEST"/*.whl; do
  count=$((count + 1))
  tags="$(basename "$whl" .whl | awk -F- '{print $(NF-2) "-" $(NF-1) "-" $NF}')"
  case "$tags" in
    py3-none-any | py2.py3-none-any) ;;
    py3-none-*manylinux*x86_64* | py2.py3-none-*manylinux*x86_64*) ;; # pure Python API, bundled x86-64 library
    cp312-cp312-*manylinux*x86_64* | cp3*-abi3-*manylinux*x86_64*) ;;
    *)
      echo "gpu-wheels: $(basename "$whl") does not install on CPython 3.12 x86-64 (tags $tags)" >&2
      bad=1
      ;;
  esac
done
if [[ "$count" -ne "${#WHEELS[@]}" ]]; then
  echo "gpu-wheels: expected ${#WHEELS[@]} wheels, got $count in $DEST" >&2
  bad=1
fi

total_bytes="$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)"
total_mib="$(awk -v b="$total_bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
ls -l "$DEST"
echo "gpu-wheels: $count wheels, $total_mib MiB in $DEST (limit $LIMIT_MIB MiB)"
if ((total_bytes >= LIMIT_MIB * 1048576)); then
  echo "gpu-wheels: $DEST is $total_mib MiB, over the $LIMIT_MIB MiB limit: it would not travel" >&2
  exit 1
fi
exit "$bad"
