#!/usr/bin/env bash
# Run as: bash scripts/setup_cpu.sh        (creates ./.venv; CPU machine, no GPU needed)
# Installs optbatch_ds with the CPU torch wheel first, so nothing pulls a multi-GB CUDA build,
# and DeepSpeed without build isolation, so it builds against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip setuptools wheel
python -m pip install -q -c constraints-cpu.txt torch
python -m pip install -q -c constraints-cpu.txt --no-build-isolation -e ".[dev,mpi]"
python -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>&1 | grep -v real_accelerator
