#!/usr/bin/env bash
# The GPU checks of issue 17 as one command for a machine with a CUDA GPU and torch/timm but no network and no
# install of sfn-deploy (the workplace's device tool): tests/test_device.py, then examples/bench_device.py.
#
#   bash examples/device_check.sh prepare     # here, with network: photos, MNIST and the missing wheels into
#                                              # .device/ (git-ignored); carry .device along
#   bash examples/device_check.sh run         # there; results and logs under $OUT (or .device/out)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEV=$ROOT/.device
case "${1:-}" in
prepare)
    mkdir -p "$DEV"/photos "$DEV"/mnist "$DEV"/whl
    grep -qx '/.device/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.device/' >>"$ROOT/.git/info/exclude"
    "$ROOT/.venv/bin/python" -c "import sys; sys.path.insert(0, '$ROOT/examples')
from bench_memory import CIFAR, photos; photos(CIFAR, ${PHOTOS:-1000}, '$DEV/photos')"
    cp "${SFN_MNIST:-$ROOT/../shared/data/mnist}"/*-ubyte.gz "$DEV/mnist/"
    # the device image has torch, timm, click, safetensors, rich, tqdm; not optuna and what it needs
    "$ROOT/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DEV/whl" optuna alembic colorlog sqlalchemy mako greenlet
    du -sh "$DEV" ;;
run)
    OUT=${OUT:-$DEV/out}
    mkdir -p "$OUT" /tmp/site/sfn_deploy
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$DEV"/whl/*.whl
    for e in "$ROOT"/sfn_deploy/*; do ln -sfn "$e" /tmp/site/sfn_deploy/; done     # pyproject's package-dir map
    for d in exporters targets simulators; do ln -sfn "$ROOT/$d" "/tmp/site/sfn_deploy/$d"; done
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 SFN_MNIST=$DEV/mnist
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    (cd "$ROOT" && python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/test_device.log")
    for m in vit_small_patch16_224 vit_base_patch16_224; do
        python3 "$ROOT/examples/bench_device.py" --photos "$DEV/photos" --model "timm:$m" --images "${IMAGES:-1024}" \
            --out "$OUT/bench_device.jsonl" 2>&1 | tail -n 3 | tee -a "$OUT/bench_device.log"
    done ;;
*)
    echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
