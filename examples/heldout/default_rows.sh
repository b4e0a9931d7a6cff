#!/usr/bin/env bash
# Default `convert` plus the given options on every held-out model, then `evaluate` on its test split: how a
# candidate default does on models it was not tuned on (docs/concepts.md "Knobs measured and not kept").
#   bash examples/heldout/default_rows.sh OUT TAG [convert options...]
#   e.g. TAG paper (no options), nearest --rounding nearest, p0.1 --percentile 0.1, levels12 --levels 12
# Models: the rows of examples/heldout/models.txt (MNIST: calibrate on images 0..7,999, test 8,000..9,999; the
# avg-pool CNNs on /tmp/heldout/mnist01_*.npz; the CIFAR models on cifar10_calib1k, the 35-minute ones on
# cifar10_calib4k, 30 trials, both tested on the 4,000 held-out images). Rows: OUT/rows.jsonl; a row whose evaluation exists is skipped, so a rerun resumes.
# Needs /tmp/heldout (train_mnist.py --write-npz), /tmp/heldout2 (train_mnist.py --seed-offset 1 --out) and
# /tmp/cifar_splits (train_cifar.py --write-splits); /tmp/heldout3 (--seed-offset 2) is used when it exists.
# ROWS=REGEX runs only the rows whose name matches (e.g. ROWS='^(heldout3|cifar)_'); MODELS=FILE reads rows in the
# same form from FILE instead (e.g. examples/heldout/models_calib4k.txt).
set -uo pipefail
cd "$(dirname "$0")/../.."
M=${SFN_MNIST:-../shared/data/mnist}
out=$1; tag=$2; shift 2; flags=("$@")
mkdir -p "$out"
row() { # name model calibration test [extra convert options...]
  local name=$1 model=$2 cal=$3 tst=$4; shift 4
  local o=$out/${name}_$tag
  [[ -n ${ROWS:-} && ! $name =~ $ROWS ]] && return 0
  [ -s "$o.eval.json" ] && return 0
  nice -n 10 .venv/bin/sfn-deploy convert "$model" --data "$cal" -o "$o.sfn.pt" --storage "$o.db" --json \
      "${flags[@]}" "$@" > "$o.convert.json" 2> "$o.err" || { echo "FAIL convert $name $tag" >> "$out/log"; return 0; }
  nice -n 10 .venv/bin/sfn-deploy evaluate "$o.sfn.pt" --data "$tst" --json > "$o.eval.json" 2>> "$o.err" \
      || { echo "FAIL evaluate $name $tag" >> "$out/log"; return 0; }
  .venv/bin/python - "$o" "$name" "$tag" "${flags[*]} $*" >> "$out/rows.jsonl" <<'PY'
import json, sys
o, name, tag, flags = sys.argv[1:]
c, e = json.load(open(o + ".convert.json")), json.load(open(o + ".eval.json"))
print(json.dumps({"model": name, "tag": tag, "flags": flags.strip(), "lam": c["lam"], "val_drop": c["drop"]["points"],
                  "val_interval": [round(c["drop"]["low"], 2), round(c["drop"]["high"], 2)],
                  "bias_correction": (c.get("bias_correction") or {}).get("applied"),
                  "test_ann": round(e["ann_accuracy"], 2), "test_snn": round(e["accuracy"], 2),
                  "test_drop": round(e["ann_accuracy"] - e["accuracy"], 2), "agreement": round(e["agreement"], 2),
                  "energy": round(e["energy_ratio"], 4), "convert_seconds": c.get("convert_seconds"),
                  "levels": c.get("levels"), "missed": c.get("missed"),
                  "check_drop": ((c.get("check") or {}).get("drop") or {}).get("points"),
                  "tries": [[t["levels"], t["fire"], t.get("check_drop"), t["kept"]] for t in c.get("tries") or []]}))
PY
}
while read -r -u 3 name model cal tst extra; do
  [[ -z $name || $name == \#* || ($model != *:* && ! -f $model) ]] && continue
  # shellcheck disable=SC2086  # extra holds several options
  row "$name" "$model" "${cal//\{mnist\}/$M}" "${tst//\{mnist\}/$M}" $extra
done 3< "${MODELS:-examples/heldout/models.txt}"
echo "DONE $tag" >> "$out/log"
