#!/usr/bin/env bash
# Default convert with --percentile P on held-out models not used to look at p (the MNIST held-out set and its fresh
# seed-offset-1 set, the CIFAR calib1k models), evaluated on their test splits: the default's p (1) against a
# smaller one (docs/concepts.md "Knobs measured and not kept"). Rows: OUT/rows.jsonl.
# Usage: bash examples/heldout/percentile_rows.sh OUT P [P ...]   (needs /tmp/heldout, /tmp/heldout2, /tmp/cifar_splits)
set -uo pipefail
cd "$(dirname "$0")/../.."
M=${SFN_MNIST:-../shared/data/mnist}
out=$1; shift; mkdir -p "$out"
row() { # name model cal test p extra...
  local name=$1 model=$2 cal=$3 tst=$4 p=$5; shift 5
  local o=$out/${name}_p$p
  [ -s "$o.eval.json" ] && return 0
  nice -n 10 .venv/bin/sfn-deploy convert "$model" --data "$cal" -o "$o.sfn.pt" --percentile "$p" --storage "$o.db" \
      --json "$@" > "$o.convert.json" 2> "$o.err" || { echo "FAIL convert $name $p" >> "$out/log"; return 0; }
  nice -n 10 .venv/bin/sfn-deploy evaluate "$o.sfn.pt" --data "$tst" --json > "$o.eval.json" 2>> "$o.err" \
      || { echo "FAIL eval $name $p" >> "$out/log"; return 0; }
  .venv/bin/python -c "
import json; c = json.load(open('$o.convert.json')); e = json.load(open('$o.eval.json'))
print(json.dumps({'model': '$name', 'percentile': $p, 'extra': '$*', 'lam': c['lam'], 'val_drop': c['drop']['points'],
 'bias_correction': (c.get('bias_correction') or {}).get('applied'), 'test_ann': round(e['ann_accuracy'], 2),
 'test_snn': round(e['accuracy'], 2), 'test_drop': round(e['ann_accuracy'] - e['accuracy'], 2),
 'agreement': round(e['agreement'], 2), 'energy': round(e['energy_ratio'], 4)}))" >> "$out/rows.jsonl"
}
for p in "$@"; do
  for set in examples/models/heldout /tmp/heldout2; do
    s=$(basename $set)
    row ${s}_avgpool_cnn $set/avgpool_cnn.pt2 /tmp/heldout/mnist01_train.npz /tmp/heldout/mnist01_test.npz $p
    for m in mlp gap_cnn vit; do
      row ${s}_$m $set/$m.pt2 mnist:$M:0:8000 mnist:$M:8000:10000 $p
    done
  done
  for m in resnet20 mobilenetv2 efficientnet vit; do
    row cifar_$m examples/models/cifar/$m.pt2 /tmp/cifar_splits/cifar10_calib1k.npz /tmp/cifar_splits/cifar10_heldout.npz $p --trials 30
  done
done
echo DONE >> "$out/log"
