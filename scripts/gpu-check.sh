#!/usr/bin/env bash
# GPU run kit, on the lent GPU machine: installs the carried wheels (.gpu-wheels/, made here by
# scripts/gpu-wheels.sh) into a folder of their own, puts it first on PYTHONPATH (so transformers 5.23.0 shadows the
# machine's 5.17), and runs the kit (python -m bench.gpu: the scheduler, then the engine), within a time budget:
#
#     bash scripts/gpu-check.sh OUT_DIR [more python -m bench.gpu options]
#
# OUT_DIR gets gpu-report.json, gpu-report.md and gpu-check.log. The defaults (--device cuda --size full
# --budget-s 420) keep the whole command under 8 minutes; GPU_CHECK_BUDGET_S changes the budget.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/gpu-check.sh OUT_DIR [python -m bench.gpu options]" >&2
  exit 2
fi
out_dir="$1"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS_DIR:-$ROOT/.gpu-wheels}"
SITE="${GPU_SITE:-/tmp/xtts-gpu-site}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"

mkdir -p "$out_dir"
exec > >(tee "$out_dir/gpu-check.log") 2>&1
started=$SECONDS

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "gpu-check: no wheels in $WHEELS: run 'bash scripts/gpu-wheels.sh' where PyPI is reachable," \
    "and carry .gpu-wheels" >&2
  exit 2
fi
rm -rf "$SITE"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The demo checkpoint (1.9 GB for full) is built there, outside the working tree.
export XTTS_TEST_CACHE="${XTTS_TEST_CACHE:-/tmp/xtts-cache}"
echo "gpu-check: ${#wheels[@]} wheels installed into $SITE in $((SECONDS - started)) s"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
"$PYTHON" - <<'PY'
import importlib.metadata as md
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available())
for name in ("transformers", "coqui-tts", "tokenizers", "huggingface-hub", "torchaudio", "numpy", "regex"):
    print(f"  {name} {md.version(name)}")
import transformers  # noqa: E402,F401  -- fails here, early, if the carried set is incomplete
from TTS.tts.models.xtts import Xtts  # noqa: E402,F401
PY

# A hard stop past the budget: the report is rewritten after every section, so what was measured comes back.
status=0
timeout --signal=INT --kill-after=20 "$((${BUDGET_S%.*} + 60))" \
  "$PYTHON" -m bench.gpu --device cuda --size full --budget-s "$BUDGET_S" --out "$out_dir" "$@" || status=$?
echo "gpu-check: finished with status $status after $((SECONDS - started)) s; report in $out_dir"
exit "$status"
