#!/usr/bin/env bash
# One command for a GPU machine: providers, TensorRT engine build + reuse, frames/s at batch 1/8/32.
# Uses .venv/bin/python when there is one, else python3 (set PYTHON= to choose). Any flags go to
# bench/gpu_check.py (--model-root, --model-pack, --quick). Never fails for what the machine lacks.
# On a GPU machine install first: python3 -m venv .venv && .venv/bin/python install_gpu.py
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
exec "$PY" bench/gpu_check.py "$@"
