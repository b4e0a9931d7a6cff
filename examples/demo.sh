#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the whole pipeline that exists so far
# on the bundled example models and real MNIST data (train on images 0..7999, test on 8000..9999).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/bootstrap.sh"
cd "$ROOT"
MNIST="${SFN_MNIST:-$ROOT/../shared/data/mnist}"
OUT="${SFN_OUT:-$ROOT/runs}"
mkdir -p "$OUT"
if [ ! -f "$MNIST/t10k-images-idx3-ubyte.gz" ]; then
  echo "MNIST not found at $MNIST (set SFN_MNIST); running the sklearn digits example only" >&2
  sfn-deploy convert examples/models/digits_mlp.pt2 --data sklearn:digits -o "$OUT/digits_mlp.sfn.pt" \
    --max-drop 0.5 --trials 30
  sfn-deploy export --target onnx "$OUT/digits_mlp.sfn.pt" -o "$OUT/digits_mlp.onnx"
  sfn-deploy simulate "$OUT/digits_mlp.sfn.pt" --data sklearn:digits --backend onnx --backend nir --backend lava
  sfn-deploy check "$OUT/digits_mlp.sfn.pt" --target loihi2
  sfn-deploy report "$OUT/digits_mlp.sfn.pt" --data sklearn:digits --target all -o "$OUT/digits_mlp.report.html"
  exit 0
fi
TRAIN="mnist:$MNIST:0:8000"
TEST="mnist:$MNIST:8000:10000"
# per model: the accuracy budget and search settings (docs/benchmarks.md says why)
declare -A OPTS=(
  [mnist_cnn]="--max-drop 0.3 --search per-block --trials 40"
  [mnist_vit]="--max-drop 0.5 --search per-block --trials 25 --rounding nearest"
)
for model in mnist_cnn mnist_vit; do
  echo
  echo "== $model: convert (calibrate on 8,000 training images; λ search: ${OPTS[$model]}) =="
  # shellcheck disable=SC2086
  sfn-deploy convert "examples/models/$model.pt2" --data "$TRAIN" -o "$OUT/$model.sfn.pt" ${OPTS[$model]}
  echo "== $model: evaluate on the 2,000 held-out test images =="
  sfn-deploy evaluate "$OUT/$model.sfn.pt" --data "$TEST"
  echo "== $model: export to ONNX and run it with onnxruntime against the torch reference =="
  sfn-deploy export --target onnx "$OUT/$model.sfn.pt" -o "$OUT/$model.onnx"
  sfn-deploy simulate "$OUT/$model.sfn.pt" --data "$TEST" --backend onnx --limit 500
  if [ "$model" = mnist_cnn ]; then   # the ViT's LayerNorm/softmax/attention have no NIR form yet
    echo "== $model: export to NIR (threshold channels) and run the file back with nirtorch =="
    sfn-deploy export --target nir "$OUT/$model.sfn.pt" -o "$OUT/$model.nir"
    sfn-deploy simulate "$OUT/$model.sfn.pt" --data "$TEST" --backend nir --limit 500
  fi
  echo "== $model: export to a Lava bundle; run it in Lava's Loihi simulation (float, then fixed point layer by layer) =="
  sfn-deploy export --target lava "$OUT/$model.sfn.pt" -o "$OUT/$model.lava"
  sfn-deploy simulate "$OUT/$model.sfn.pt" --data "$TEST" --backend lava --limit 200
  sfn-deploy simulate "$OUT/$model.sfn.pt" --data "$TEST" --backend lava --precision fixed_pt --per-layer --limit 100
  echo "== $model: pre-flight check on Loihi 2 =="
  sfn-deploy check "$OUT/$model.sfn.pt" --target loihi2
done
for model in mnist_cnn mnist_vit; do
  echo
  echo "== $model: hardware report on every shipped target, ranked (energy and latency with back-test bands) =="
  sfn-deploy report "$OUT/$model.sfn.pt" --data "$TEST" --target all -o "$OUT/$model.report.html"
done
echo
echo "reports: $OUT/mnist_cnn.report.html $OUT/mnist_vit.report.html (self-contained; open in a browser)"
