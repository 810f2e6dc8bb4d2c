#!/usr/bin/env bash
# Wheels of what kdexp needs and a lent GPU machine lacks (it has torch, transformers, accelerate
# and peft, and no network), into .whl/ for the device tool's `carry`. Run here, once a session:
#
#   bash scripts/gpu_wheels.sh
#   # then on the GPU, in one call with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 && make gpu-check PYTHON=python3
#
# (make gpu-check writes its results under $OUT when it is set, as it is there.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any)
# Versions that fit the GPU image's own packages (huggingface-hub < 2, pyarrow >= 21).
python3 -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl \
    hydra-core==1.3.2 omegaconf==2.3.0 nltk==3.10.4 trl==1.16.0 datasets==4.7.0 dill==0.4.0 \
    multiprocess==0.70.18 liger-kernel==0.8.5
# Published as source only: built here (pure Python).
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 rouge-score==0.1.2
ls .whl
