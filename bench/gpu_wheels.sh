#!/usr/bin/env bash
# Wheels of what the GPU machine's image lacks, for a machine with no registry: DeepSpeed (the FT
# baseline of `offsite bench` where plain FT does not fit, method ft+zero) and the packages it
# needs that the image does not hold, and Liger Kernel (a baseline of bench/fused_ops_gpu.py; pure
# Python on the image's torch and triton). Run here, where pip reaches a registry; the wheels go to
# .whl/ (ignored by git), which a device call carries and installs with
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
# DeepSpeed ships as a source distribution only: it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0: its C++/CUDA ops are compiled on first use on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
PY=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" -w .whl
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
python3 -m pip download -q "${PY[@]}" -d .whl "liger-kernel==${LIGER_VERSION}"
python3 -m pip download -q "${PY[@]}" -d .whl hjson "pydantic>=2,<3" annotated-types typing-inspection
# pydantic-core must be the version the downloaded pydantic pins
CORE=$(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
python3 -m pip download -q "${PY[@]}" "${PLATFORMS[@]}" -d .whl "pydantic-core==${CORE}"
ls -la .whl
du -sh .whl
