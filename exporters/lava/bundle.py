"""The Lava bundle: a folder with ``manifest.json`` (format, version, plans, checksum) and
``arrays.npz`` (weights, thresholds, host constants), loadable without torch or pickles.

One bundle holds one lowering (graded or channels) in both precisions where it can
(fixed point needs the input's range when the input feeds a weight layer directly).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ...errors import UserError
from ...models import file_sha256
from .plan import PRECISIONS, Block, Plan

FORMAT = "sfn-deploy/lava-bundle"
FORMAT_VERSION = 1


def _plan_to_json(plan: Plan, arrays: dict, prefix: str) -> dict:
    blocks = []
    for b in plan.blocks:
        keys = {}
        for k, a in b.arrays.items():
            key = f"{prefix}/{b.name}/{k}"
            arrays[key] = np.asarray(a)
            keys[k] = key
        blocks.append({"name": b.name, "kind": b.kind, "stage": b.stage, "attrs": b.attrs, "ir": b.ir,
                       "arrays": keys})
    return {"lowering": plan.lowering, "precision": plan.precision, "blocks": blocks,
            "connections": plan.connections, "input_block": plan.input_block, "output_block": plan.output_block,
            "latency": plan.latency, "input_shape": plan.input_shape, "output_shape": plan.output_shape,
            "sites": plan.sites}


def _plan_from_json(d: dict, arrays) -> Plan:
    blocks = [Block(b["name"], b["kind"], b["stage"], b["attrs"], {k: arrays[v] for k, v in b["arrays"].items()},
                    b["ir"]) for b in d["blocks"]]
    return Plan(d["lowering"], d["precision"], blocks, d["connections"], d["input_block"], d["output_block"],
                d["latency"], d["input_shape"], d["output_shape"], d["sites"])


def write_bundle(path: str, plans: dict, info: dict) -> dict:
    """Write plans ({precision: Plan}) to the folder ``path`` atomically: built in a temporary folder
    beside it, then renamed (an existing bundle is replaced only once the new one is complete)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{path}: output folder {parent} does not exist")
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "manifest.json")):
        if not os.path.isdir(path) or os.listdir(path):
            raise UserError(f"{path}: exists and is not a Lava bundle; refusing to overwrite it")
    tmp = tempfile.mkdtemp(prefix=".tmp-lava-", dir=parent)
    try:
        arrays: dict = {}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **info,
                    "plans": {p: _plan_to_json(plan, arrays, p) for p, plan in plans.items()}}
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        manifest["arrays_sha256"] = file_sha256(os.path.join(tmp, "arrays.npz"))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, default=_json_default)
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-lava-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def read_bundle(path: str, precision: str | None = None) -> tuple[dict, dict]:
    """(manifest, {precision: Plan}) of a bundle, after checking format, version and checksum."""
    man_path = os.path.join(path, "manifest.json")
    arr_path = os.path.join(path, "arrays.npz")
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a Lava bundle folder (run 'sfn-deploy export --target lava' first)")
    if not os.path.isfile(man_path) or not os.path.isfile(arr_path):
        raise UserError(f"{path}: damaged Lava bundle (manifest.json or arrays.npz missing)")
    try:
        with open(man_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{man_path}: unreadable manifest ({e})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an sfn-deploy Lava bundle (format {manifest.get('format')!r})")
    v = manifest.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise UserError(f"{path}: bundle format version {v} is newer than this sfn-deploy reads ({FORMAT_VERSION})")
    if file_sha256(arr_path) != manifest.get("arrays_sha256"):
        raise UserError(f"{path}: arrays.npz does not match the manifest's checksum (damaged or mixed bundles)")
    plans_json = manifest.get("plans", {})
    if precision is not None and precision not in plans_json:
        have = ", ".join(plans_json) or "none"
        why = manifest.get("missing", {}).get(precision, "")
        raise UserError(f"{path}: the bundle has no {precision} plan (it has: {have}){'; ' + why if why else ''}")
    arrays = np.load(arr_path, allow_pickle=False)
    try:
        plans = {p: _plan_from_json(d, arrays) for p, d in plans_json.items()
                 if p in PRECISIONS and (precision is None or p == precision)}
    except KeyError as e:
        raise UserError(f"{path}: damaged Lava bundle (missing array {e})")
    return manifest, plans
