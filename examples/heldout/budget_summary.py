#!/usr/bin/env python
"""Issue 16's budget figure from ``default_rows.sh`` rows run with ``--max-drop D``: the test drop against D plus
the half-width of the validation drop's paired interval that ``convert`` reported.

    python examples/heldout/budget_summary.py OUT/rows.jsonl
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print("| model | D | val drop (95 % CI) | M | correction | test drop | limit | kept | energy |")
    print("|---|---|---|---|---|---|---|---|---|")
    kept: dict[float, list[bool]] = {}
    for r in rows:
        flags = r["flags"].split()
        if "--max-drop" not in flags:
            continue
        d = float(flags[flags.index("--max-drop") + 1])
        lo, hi = r["val_interval"]
        limit = d + (hi - lo) / 2
        ok = r["test_drop"] <= limit + 1e-9
        kept.setdefault(d, []).append(ok)
        print(f"| {r['model']} | {d:g} | {r['val_drop']:.2f} ({lo:.2f} to {hi:.2f}) | {r['levels']} | "
              f"{'kept' if r['bias_correction'] else 'not kept'} | {r['test_drop']:.2f} | {limit:.2f} | "
              f"{'yes' if ok else '**no**'} | {r['energy']:.4f} |")
    for d, oks in sorted(kept.items()):
        print(f"\nD = {d:g}: budget kept on {sum(oks)} of {len(oks)}")


if __name__ == "__main__":
    main(sys.argv[1])
