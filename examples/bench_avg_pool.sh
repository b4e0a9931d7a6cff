#!/usr/bin/env bash
# Average pooling of spikes, folded into the next weights vs pooling layers (issue 15; docs/lava.md, "Events: folded
# vs a pooling layer"), on held-out trained models the Lava lowering was not tuned on: the report's two forms on
# 500 held-out images (loihi2 in full; the form spinnaker2 and akd1000 keep), and Lava fixed point in both forms
# on 50 of them (prediction agreement with the float torch SNN, and with the integer reference, which must be
# 100 %).
#   CIFAR=/tmp/cifar_splits MNIST=/tmp/heldout bash examples/bench_avg_pool.sh OUT
#   ONLY=NAME ... runs one row.
# CIFAR: examples/train_cifar.py's splits (calib1k for calibration, heldout for the figures); MNIST: the held-out
# MNIST split of examples/heldout/train_mnist.py --write-npz (train for calibration, test for the figures), which
# avgpool_cnn reads ([0, 1] pixels); gap_cnn reads the normalised MNIST it was trained on (MNIST_RAW, default
# /work/shared/data/mnist: images 0..7,999 calibrate, 8,000..9,999 give the figures; examples/heldout/README.md).
set -euo pipefail
out=${1:?output folder}
MNIST_RAW=${MNIST_RAW:-/work/shared/data/mnist}
only=${ONLY:-}            # a row name: run that row only
mkdir -p "$out"
sfn=${SFN:-.venv/bin/sfn-deploy}
row() {   # name model calib test
  local name=$1 model=$2 calib=$3 test=$4
  if [ -n "$only" ] && [ "$only" != "$name" ]; then return; fi
  "$sfn" convert "$model" --data "$calib" --scale 0.3 -o "$out/$name.sfn.pt" --json > "$out/$name.convert.json"
  "$sfn" report "$out/$name.sfn.pt" --data "$test" --limit 500 --target loihi2 --target spinnaker2 \
    --target akd1000 --json > "$out/$name.report.json"
  for form in folded layer; do
    "$sfn" simulate "$out/$name.sfn.pt" --data "$test" --limit 50 --backend lava --precision fixed_pt \
      --avg-pool "$form" --json > "$out/$name.lava_$form.json"
  done
  python3 - "$out" "$name" <<'PY'
import json, sys
out, name = sys.argv[1:]
rep = json.load(open(f"{out}/{name}.report.json"))
est = {t: v["estimate"] for t, v in rep["targets"].items()}
row = {"model": name, "avg_pool": est["loihi2"].get("avg_pool"),      # both forms, whole estimates included
       "chosen": {t: (e.get("avg_pool") or {}).get("chosen") for t, e in est.items()}}
for form in ("folded", "layer"):
    lv = json.load(open(f"{out}/{name}.lava_{form}.json"))["backends"]["lava"]
    row[form] = {"agreement_with_torch_snn": lv["prediction_agreement"],
                 "integer_reference_agreement": lv["integer_reference"].get("lava_prediction_agreement"),
                 "latency_steps": lv["lava"]["latency_steps"], "processes": lv["lava"]["processes"],
                 "overflows": lv["lava"]["overflows"], "saturations": lv["lava"]["saturations"]}
print(json.dumps(row))
PY
}
row resnet20_cifar examples/models/cifar/resnet20.pt2 "$CIFAR/cifar10_calib1k.npz" "$CIFAR/cifar10_heldout.npz" | tee -a "$out/rows.jsonl"
row mobilenetv2_cifar examples/models/cifar/mobilenetv2.pt2 "$CIFAR/cifar10_calib1k.npz" "$CIFAR/cifar10_heldout.npz" | tee -a "$out/rows.jsonl"
row avgpool_cnn_mnist examples/models/heldout/avgpool_cnn.pt2 "$MNIST/mnist01_train.npz" "$MNIST/mnist01_test.npz" | tee -a "$out/rows.jsonl"
row gap_cnn_mnist examples/models/heldout/gap_cnn.pt2 "mnist:$MNIST_RAW:0:8000" "mnist:$MNIST_RAW:8000:10000" \
  | tee -a "$out/rows.jsonl"
