"""Hostile files for the hardening tests: a payload that would write a marker file, planted in every place a
file format could run it. Each builder copies a good file and changes one thing."""
from __future__ import annotations

import functools
import io
import json
import pickle
import zipfile


class Payload:
    """Unpickling this calls open(marker, 'w'): the marker's existence proves code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker: str, protocol: int = 2) -> bytes:
    return pickle.dumps({"x": Payload(marker)}, protocol=protocol)


def torch_save_payload(marker: str) -> bytes:
    """A torch.save zip archive whose data.pkl holds the payload (what torch.load reads)."""
    import torch
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            blob = zin.read(info)
            if info.filename.endswith("data.pkl"):
                blob = pickle_payload(marker)
            zout.writestr(info, blob)
    return out.getvalue()


def rewrite_zip(src: str, dst: str, edit) -> None:
    """Copy a zip archive, passing each (relative name, bytes) through edit(rel, blob) -> bytes | None
    (None drops the entry); edit may return extra entries as a dict under the key '__add__'."""
    zin = zipfile.ZipFile(src)
    root = zin.namelist()[0].split("/", 1)[0]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            blob = edit(rel, zin.read(info))
            if blob is not None:
                zout.writestr(info.filename, blob)
        extra = edit("__add__", b"")
        for rel, blob in (extra or {}).items():
            zout.writestr(f"{root}/{rel}", blob)


def _sample_inputs(marker, rel, blob):
    return torch_save_payload(marker) if rel.startswith("data/sample_inputs/") else (
        None if rel == "__add__" else blob)


def _pickled_weight(marker, rel, blob):
    if rel == "data/weights/model_weights_config.json":
        cfg = json.loads(blob)
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        return json.dumps(cfg).encode()
    if rel == "data/weights/weight_0":
        return torch_save_payload(marker)
    return None if rel == "__add__" else blob


def _legacy_weights(marker, rel, blob):
    if rel == "__add__":
        return {"data/weights/model.pt": torch_save_payload(marker)}
    return blob


def _custom_object(marker, rel, blob):
    if rel == "data/constants/model_constants_config.json":
        cfg = json.loads(blob)
        cfg["config"]["evil"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False,
                                 "tensor_meta": None}
        return json.dumps(cfg).encode()
    if rel == "__add__":
        return {"data/constants/custom_obj_0": pickle_payload(marker)}
    return blob


def _sympy_expr(marker, rel, blob):
    if rel.startswith("models/") and rel.endswith(".json"):
        text = blob.decode()
        return text.replace("Symbol('s", f"(__import__('builtins').open({marker!r}, 'w') and 0) + Symbol('s",
                            1).encode()
    return None if rel == "__add__" else blob


def _operator_target(marker, rel, blob):
    if rel.startswith("models/") and rel.endswith(".json"):
        prog = json.loads(blob)
        prog["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
        return json.dumps(prog).encode()
    return None if rel == "__add__" else blob


def _guard_code(marker, rel, blob):
    if rel.startswith("models/") and rel.endswith(".json"):
        prog = json.loads(blob)
        prog["guards_code"] = [f"open({marker!r}, 'w')"]
        return json.dumps(prog).encode()
    return None if rel == "__add__" else blob


def _aot_library(marker, rel, blob):
    if rel == "__add__":
        return {"data/aotinductor/model/model.so": b"\x7fELF" + b"\0" * 60}
    return blob


def pt2_variants(src: str, marker: str) -> dict:
    """{name: edit function} for rewrite_zip: one hostile .pt2 per place torch.export.load could run code."""
    return {name: functools.partial(edit, marker) for name, edit in (
        ("sample_inputs", _sample_inputs),
        ("pickled_weight", _pickled_weight),
        ("legacy_weights", _legacy_weights),
        ("custom_object", _custom_object),
        ("sympy_expr", _sympy_expr),
        ("operator_target", _operator_target),
        ("guard_code", _guard_code),
        ("aot_library", _aot_library),
    )}
