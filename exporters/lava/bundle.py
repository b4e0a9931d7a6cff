"""The Lava bundle: a folder with ``manifest.json`` (format, version, plans, checksum) and
``arrays.npz`` (weights, thresholds, host constants), loadable without torch or pickles.

One bundle holds one lowering (graded or channels) in both precisions where it can
(fixed point needs the input's range when the input feeds a weight layer directly).

Integrity (format version 2): the manifest's ``sha256`` covers the whole manifest but that key
(canonical JSON, :func:`manifest_digest`), and with it ``arrays_sha256``, the SHA-256 of the
bytes of ``arrays.npz``: one checksum over everything a bundle runs from. Reading verifies it,
then :func:`.validate.validate_plan` re-derives what the plan's structure determines (array shapes from the
blocks' sizes, port sizes along every connection, stages, host delays and the latency), so a
bundle from a buggy or foreign writer with a correct checksum is refused before Lava starts.
Nothing in a bundle is executed: JSON and ``np.load(allow_pickle=False)`` only.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from ...errors import UserError
from ...untrusted import read_bytes, reason, regular_file, zip_overexpands
from .plan import PRECISIONS, Block, Plan
from .validate import one_line as _one_line
from .validate import show, validate_plan

FORMAT = "sfn-deploy/lava-bundle"
FORMAT_VERSION = 2          # 2: "sha256" over the manifest and (through arrays_sha256) the arrays; version 1
                            # bundles carry no checksum over the manifest and are refused (re-export them)
FILES = ("manifest.json", "arrays.npz")


# -- checksum -----------------------------------------------------------------------------------------------

def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest without its ``sha256`` key, as canonical JSON (sorted keys, no spaces,
    ASCII). The manifest holds ``arrays_sha256``, so this one digest covers the arrays too."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# -- writing ------------------------------------------------------------------------------------------------

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


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_target(path: str) -> str:
    """The parent folder; refuse a target that exists and is not a bundle (a file, a folder with other files,
    a folder whose manifest.json belongs to something else)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{path}: output folder {parent} does not exist")
    if not os.path.lexists(path):
        return parent
    refuse = UserError(f"{path}: exists and is not a Lava bundle; refusing to overwrite it")
    if not os.path.isdir(path):
        raise refuse
    names = set(os.listdir(path))
    if not names:
        return parent
    if names - set(FILES) or not os.path.isfile(os.path.join(path, "manifest.json")):
        raise refuse
    try:
        with open(os.path.join(path, "manifest.json"), "rb") as f:
            old = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return parent                               # a damaged bundle: re-exporting it is the cure
    if isinstance(old, dict) and old.get("format") != FORMAT:
        raise refuse
    return parent


def write_bundle(path: str, plans: dict, info: dict) -> dict:
    """Write plans ({precision: Plan}) to the folder ``path`` atomically: built in a temporary folder
    beside it, read back and checked like any bundle, then renamed (an existing bundle is replaced only
    once the new one is complete, and put back if the rename fails)."""
    parent = _check_target(path)
    arrays: dict = {}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **info,
                "plans": {p: _plan_to_json(plan, arrays, p) for p, plan in plans.items()}}
    for key, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise RuntimeError(f"Lava export: array {key} has dtype {a.dtype}; a bundle holds numbers only")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz = buf.getvalue()
    manifest["arrays_sha256"] = hashlib.sha256(npz).hexdigest()
    manifest = json.loads(json.dumps(manifest, default=_json_default))     # exactly what a reader parses
    manifest["sha256"] = manifest_digest(manifest)
    text = json.dumps(manifest, indent=1).encode("utf-8")
    tmp = tempfile.mkdtemp(prefix=".tmp-lava-", dir=parent)
    try:
        _write_file(os.path.join(tmp, "arrays.npz"), npz)
        _write_file(os.path.join(tmp, "manifest.json"), text)
        try:
            read_bundle(tmp)
        except UserError as e:                      # the lowering produced an inconsistent plan: our bug
            raise RuntimeError(f"Lava export wrote a bundle that does not pass its own checks: {e}") from e
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=".old-lava-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old:
                os.rename(old, path)                # the old bundle goes back where it was
            raise
        _fsync_dir(parent)
        if old and os.path.islink(old):
            os.unlink(old)
        elif old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# -- reading ------------------------------------------------------------------------------------------------

def read_bundle(path: str, precision: str | None = None) -> tuple[dict, dict]:
    """(manifest, {precision: Plan}) of a bundle (all plans, or only ``precision``'s), after checking
    format, version, the checksum over manifest and arrays, and each plan's structure
    (:func:`validate_plan`). Any problem is a one-line UserError naming the bundle and what is wrong."""
    man_path = os.path.join(path, "manifest.json")
    arr_path = os.path.join(path, "arrays.npz")
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a Lava bundle folder (run 'sfn-deploy export --target lava' first)")
    if not os.path.isfile(man_path) or not os.path.isfile(arr_path):
        raise UserError(f"{path}: damaged Lava bundle (manifest.json or arrays.npz missing)")
    manifest = _read_manifest(path, man_path)
    plans_json = _plans_listed(path, manifest, precision)
    loaded = _load_plans(path, arr_path, manifest, plans_json, precision)
    plans = {}
    for p, plan in loaded.items():
        where = f"{path}: invalid Lava bundle, {p} plan"
        _check_plan_agrees(where, p, plan, manifest)
        validate_plan(plan, where)
        plans[p] = plan
    return manifest, plans


def _read_manifest(path: str, man_path: str) -> dict:
    """The manifest, checked for format, version and its own checksum."""
    man_bytes = read_bytes(man_path, "Lava bundle manifest")
    try:
        manifest = json.loads(man_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{man_path}: unreadable manifest ({_one_line(reason(e))})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: not an sfn-deploy Lava bundle (format {_one_line(repr(fmt))[:80]})")
    v = manifest.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{path}: damaged Lava bundle (format_version {_one_line(repr(v))[:80]})")
    if v > FORMAT_VERSION:
        raise UserError(f"{path}: bundle format version {v} is newer than this sfn-deploy reads ({FORMAT_VERSION})")
    if v < FORMAT_VERSION:
        raise UserError(f"{path}: Lava bundle format version {v} has no checksum over its manifest and is no longer "
                        f"read; re-export it (sfn-deploy export --target lava MODEL -o {path})")
    if manifest.get("sha256") != manifest_digest(manifest):
        raise UserError(f"{path}: manifest.json does not match its checksum (edited or damaged bundle); re-export it")
    return manifest


def _plans_listed(path: str, manifest: dict, precision: str | None) -> dict:
    """The manifest's plans (JSON), known precisions only, holding ``precision``'s when one is asked for."""
    plans_json = manifest.get("plans")
    if not isinstance(plans_json, dict) or not plans_json:
        raise UserError(f"{path}: invalid Lava bundle: 'plans' holds no plan")
    unknown = [p for p in plans_json if p not in PRECISIONS]
    if unknown:
        raise UserError(f"{path}: invalid Lava bundle: 'plans' has unknown precision {_one_line(unknown[0])[:80]!r}")
    if precision is not None and precision not in plans_json:
        have = ", ".join(plans_json)
        missing = manifest.get("missing")
        why = missing.get(precision, "") if isinstance(missing, dict) else ""
        why = _one_line(why) if isinstance(why, str) else ""
        raise UserError(f"{path}: the bundle has no {precision} plan (it has: {have}){'; ' + why if why else ''}")
    return plans_json


def _load_plans(path: str, arr_path: str, manifest: dict, plans_json: dict, precision: str | None) -> dict:
    """The plans with their arrays, read after checking the arrays file against the manifest's checksum."""
    regular_file(arr_path, "Lava bundle arrays file")
    try:
        f = open(arr_path, "rb")  # noqa: SIM115  open alone is tried (its OSError is the read error); `with f` closes
    except OSError as e:
        raise UserError(f"{arr_path}: cannot read ({e.strerror})") from e
    with f:                     # hashed and loaded through one handle: the bytes checked are the bytes loaded
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if h.hexdigest() != manifest.get("arrays_sha256"):
            raise UserError(f"{path}: arrays.npz does not match the manifest's checksum (damaged or mixed bundles)")
        arrays = _open_arrays(path, f)
        try:
            return {p: _plan_from_json(d, arrays, f"{path}: invalid Lava bundle, {p} plan")
                    for p, d in plans_json.items() if precision is None or p == precision}
        finally:
            arrays.close()


def _check_plan_agrees(where: str, p: str, plan, manifest: dict) -> None:
    """A plan says the same as the manifest about its precision, lowering and input shape."""
    if plan.precision != p:
        raise UserError(f"{where}: 'precision' is {_one_line(repr(plan.precision))[:80]}")
    if plan.lowering != manifest.get("lowering"):
        raise UserError(f"{where}: 'lowering' is {show(plan.lowering)}, the manifest's is "
                        f"{_one_line(repr(manifest.get('lowering')))[:80]}")
    if manifest.get("input_shape") != plan.input_shape:
        raise UserError(f"{where}: 'input_shape' {show(plan.input_shape)} differs from the manifest's "
                        f"{_one_line(repr(manifest.get('input_shape')))[:80]}")


def _open_arrays(path: str, f):
    """The arrays archive (open file ``f``), checked to be a plain .npz (a zip of .npy members) that does not
    expand absurdly; arrays load from it lazily, without pickles."""
    where = os.path.join(path, "arrays.npz")
    size = f.seek(0, os.SEEK_END)
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            total = zip_overexpands(z.infolist(), size)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{where}: damaged arrays file, not an .npz archive ({_one_line(reason(e))})") from e
    if total:
        raise UserError(f"{where}: damaged arrays file (members expand to {total:,} bytes from {size:,})")
    try:
        f.seek(0)
        z = np.load(f, allow_pickle=False)
    except Exception as e:                          # whatever the bytes are, they are not our arrays
        raise UserError(f"{where}: damaged arrays file ({_one_line(reason(e))})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{where}: damaged arrays file (not an .npz archive)")
    return z


def _load_array(arrays, key, where: str, block: str, name: str) -> np.ndarray:
    what = f"{where}: block {block}: array {show(name)} ({show(key)})"
    if not isinstance(key, str) or key not in arrays.files:
        raise UserError(f"{what} is missing from arrays.npz")
    try:
        a = arrays[key]
    except Exception as e:                          # object arrays (allow_pickle=False), truncated members, ...
        why = "an object array (pickled Python objects; never loaded)" if "Object arrays" in str(e) else \
            f"unreadable ({_one_line(reason(e))})"
        raise UserError(f"{what} is {why}") from e
    if not isinstance(a, np.ndarray):              # a member that is not an .npy file comes back as bytes
        raise UserError(f"{what} is not an .npy array")
    if a.dtype.kind not in "biuf":
        raise UserError(f"{what} has dtype {a.dtype} (a bundle holds numbers only)")
    return a


def _plan_from_json(d, arrays, where: str) -> Plan:
    keys = ("lowering", "precision", "blocks", "connections", "input_block", "output_block", "latency",
            "input_shape", "output_shape", "sites")
    if not isinstance(d, dict):
        raise UserError(f"{where}: not an object")
    for k in keys:
        if k not in d:
            raise UserError(f"{where}: field {k!r} is missing")
    if not isinstance(d["blocks"], list):
        raise UserError(f"{where}: 'blocks' is not a list")
    blocks = []
    for i, b in enumerate(d["blocks"]):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            raise UserError(f"{where}: blocks[{i}] has no name")
        name = _one_line(b["name"])[:80]
        for k in ("kind", "stage", "attrs", "ir", "arrays"):
            if k not in b:
                raise UserError(f"{where}: block {name}: field {k!r} is missing")
        if not isinstance(b["arrays"], dict) or not isinstance(b["attrs"], dict):
            raise UserError(f"{where}: block {name}: 'arrays' and 'attrs' must be objects")
        loaded = {k: _load_array(arrays, v, where, name, k) for k, v in b["arrays"].items()}
        blocks.append(Block(b["name"], b["kind"], b["stage"], b["attrs"], loaded, b["ir"]))
    return Plan(d["lowering"], d["precision"], blocks, d["connections"], d["input_block"], d["output_block"],
                d["latency"], d["input_shape"], d["output_shape"], d["sites"])
