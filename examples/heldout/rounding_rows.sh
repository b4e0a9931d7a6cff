#!/usr/bin/env bash
# Default convert with the paper's and with nearest rounding on the fresh MNIST set (seed offset 1) and the CIFAR models
# (docs/zoo.md, the rounding table). Rows go to OUT/rows.jsonl (OUT: /tmp/rnd); appended to
# examples/heldout/default_convert_nearest_results.jsonl. Needs /tmp/heldout (train_mnist.py --write-npz) and /tmp/cifar_splits.
set -uo pipefail
cd "$(dirname "$0")/../.."
M=${SFN_MNIST:-../shared/data/mnist}
out=${1:-/tmp/rnd}; mkdir -p "$out"
row() { # name model cal test rounding extra...
  local name=$1 model=$2 cal=$3 tst=$4 r=$5; shift 5
  local o=$out/${name}_$r
  [ -s "$o.eval.json" ] && return 0
  nice -n 10 .venv/bin/sfn-deploy convert "$model" --data "$cal" -o "$o.sfn.pt" --rounding "$r" --storage "$o.db" --json "$@" > "$o.convert.json" 2> "$o.err" || { echo "FAIL convert $name $r" >> $out/log; return 0; }
  nice -n 10 .venv/bin/sfn-deploy evaluate "$o.sfn.pt" --data "$tst" --json > "$o.eval.json" 2>>"$o.err" || { echo "FAIL eval $name $r" >> $out/log; return 0; }
  .venv/bin/python -c "
import json; c = json.load(open('$o.convert.json')); e = json.load(open('$o.eval.json'))
print(json.dumps({'model': '$name', 'rounding': '$r', 'extra': '$*', 'lam': c['lam'], 'val_drop': c['drop']['points'],
 'bias_correction': (c.get('bias_correction') or {}).get('applied'), 'test_ann': round(e['ann_accuracy'], 2),
 'test_snn': round(e['accuracy'], 2), 'test_drop': round(e['ann_accuracy'] - e['accuracy'], 2),
 'agreement': round(e['agreement'], 2), 'energy': round(e['energy_ratio'], 4)}))" >> $out/rows.jsonl
}
# fresh MNIST set (seed offset 1)
if [ ! -s /tmp/heldout2/gap_cnn.pt2 ]; then
  nice -n 10 .venv/bin/python examples/heldout/train_mnist.py --seed-offset 1 --out /tmp/heldout2 --only avgpool_cnn --only mlp --only gap_cnn --mnist $M >> $out/train.log 2>&1
fi
for r in paper nearest; do
  row heldout2_avgpool_cnn /tmp/heldout2/avgpool_cnn.pt2 /tmp/heldout/mnist01_train.npz /tmp/heldout/mnist01_test.npz $r
  row heldout2_mlp /tmp/heldout2/mlp.pt2 mnist:$M:0:8000 mnist:$M:8000:10000 $r
  row heldout2_gap_cnn /tmp/heldout2/gap_cnn.pt2 mnist:$M:0:8000 mnist:$M:8000:10000 $r
done
for m in resnet20 mobilenetv2 efficientnet vit; do
  row cifar_$m examples/models/cifar/$m.pt2 /tmp/cifar_splits/cifar10_calib1k.npz /tmp/cifar_splits/cifar10_heldout.npz nearest --trials 30
done
echo DONE >> $out/log
