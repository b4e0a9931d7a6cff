#!/usr/bin/env bash
# `convert` with no search options, --bias-correction off and auto, on the held-out MNIST models, evaluated on the
# test split (docs/benchmarks.md "Bias correction"). Usage: bash examples/heldout/default_convert.sh OUT [MODELDIR...]
# MODELDIR defaults to examples/models/heldout; a fresh set: train_mnist.py --seed-offset 1 --out DIR.
# avgpool_cnn reads /tmp/heldout/mnist01_{train,test}.npz (train_mnist.py --write-npz /tmp/heldout).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1; shift
mkdir -p "$out"
M=${SFN_MNIST:-../shared/data/mnist}
for set in "${@:-examples/models/heldout}"; do
  for m in avgpool_cnn mlp gap_cnn vit; do
    if [ $m = avgpool_cnn ]; then cal=/tmp/heldout/mnist01_train.npz; tst=/tmp/heldout/mnist01_test.npz
    else cal=mnist:$M:0:8000; tst=mnist:$M:8000:10000; fi
    for bc in off auto; do
      o=$out/$(basename "$set")_${m}_$bc
      .venv/bin/sfn-deploy convert "$set/$m.pt2" --data "$cal" -o "$o.sfn.pt" --bias-correction $bc \
          --storage "$o.db" --json > "$o.convert.json"
      .venv/bin/sfn-deploy evaluate "$o.sfn.pt" --data "$tst" --json > "$o.eval.json"
      .venv/bin/python -c "
import json, sys; c = json.load(open('$o.convert.json')); e = json.load(open('$o.eval.json'))
print(json.dumps({'set': '$(basename "$set")', 'model': '$m', 'bc': '$bc', 'lam': c['lam'],
                  'val_drop': c['drop']['points'], 'bias_correction': (c.get('bias_correction') or {}).get('applied'),
                  'test_ann': e['ann_accuracy'], 'test_snn': e['accuracy'],
                  'test_drop': round(e['ann_accuracy'] - e['accuracy'], 2), 'agreement': e['agreement'],
                  'energy': e['energy_ratio']}))" | tee -a "$out/rows.jsonl"
    done
  done
done
