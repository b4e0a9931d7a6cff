"""Model loading (SPEC §6 "Models in"): torch.export programs, timm and torchvision names, trusted pickles."""
from __future__ import annotations

import ast
import hashlib
import os
from typing import Any

import torch

from .errors import UserError
from .ir import nonfinite
from .untrusted import load_exported_program, read_bytes, reason, regular_file, torch_loads


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _top_level_items(text: str) -> list[str]:
    """Split at commas outside brackets: 'a=1,b=(2,3)' → ['a=1', 'b=(2,3)']."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse_model_args(text: str | None) -> dict:
    """'num_classes=10,out_indices=(2,3)' → {'num_classes': 10, 'out_indices': (2, 3)} (Python literals, else
    strings; commas inside brackets belong to the value)."""
    out: dict = {}
    if not text:
        return out
    for item in _top_level_items(text):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"--model-args: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def _load_state_dict(path: str) -> tuple[dict, str]:
    """(state dict, sha256 of the file), from one read of the file."""
    data = read_bytes(path, "weights file")
    sd: Any                                     # untrusted content: checked below
    if path.endswith(".safetensors"):
        from safetensors.torch import load
        try:
            sd = load(data)
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({reason(e)})") from e
    else:
        sd = torch_loads(data, path, "weights file")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return sd, hashlib.sha256(data).hexdigest()


def _check_finite(path: str, kind: str, tensors: dict) -> None:
    """NaN or Inf weights make every later number meaningless: refuse them naming the first one."""
    for name, t in tensors.items():
        bad = nonfinite(t) if isinstance(t, torch.Tensor) else 0
        if bad:
            raise UserError(f"{path}: {kind} {name!r} holds NaN/Inf values ({bad} of {t.numel()})")


LIBRARIES = ("timm:", "torchvision:")      # model names built by a library, weights from --weights


def library_spec(spec: str) -> bool:
    """A model named by a library (built in this process) rather than read from a file."""
    return spec.startswith(LIBRARIES)


def _build(spec: str, model_args: dict) -> torch.nn.Module:
    """The library's model with random weights (no download: ``pretrained``/``weights`` stay off)."""
    library, name = spec.split(":", 1)
    try:
        if library == "timm":
            import timm
            return timm.create_model(name, pretrained=False, **model_args)
        import torchvision
        if name not in torchvision.models.list_models():
            raise UserError(f"{spec}: not a torchvision model (torchvision.models.list_models() names them)")
        return torchvision.models.get_model(name, weights=None, **model_args)
    except RuntimeError as e:
        raise UserError(f"{spec}: {str(e).splitlines()[0]}") from e
    except (TypeError, ValueError) as e:
        raise UserError(f"{spec}: bad --model-args ({e})") from e


def load_model(spec: str, weights: str | None = None, model_args: dict | None = None,
               trust_pickle: bool = False):
    """Return (model, identity): model is an ExportedProgram or an eval-mode nn.Module."""
    identity: dict = {"spec": spec}
    if library_spec(spec):
        model = _build(spec, dict(model_args or {}))
        identity["model_args"] = dict(model_args or {})
        if weights:
            sd, digest = _load_state_dict(weights)
            result = model.load_state_dict(sd, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise UserError(f"{weights}: does not match {spec} ({len(result.missing_keys)} missing, "
                                f"{len(result.unexpected_keys)} unexpected keys, e.g. "
                                f"{(result.missing_keys or result.unexpected_keys)[0]!r})")
            _check_finite(weights, "weight", sd)
            identity["weights"] = {"path": os.path.basename(weights), "sha256": digest}
        else:
            identity["weights"] = None
        return model.eval(), identity
    regular_file(spec, "model file")
    if spec.endswith(".pt2"):
        ep, identity["sha256"] = load_exported_program(spec)
        _check_finite(spec, "parameter", ep.state_dict)
        _check_finite(spec, "tensor constant", ep.constants)
        return ep, identity
    identity["sha256"] = file_sha256(spec)
    if not trust_pickle:
        raise UserError(f"{spec}: loading a pickled model can run arbitrary code; pass --trust-pickle if you "
                        "trust the file, or export it with torch.export.save to a .pt2 file")
    try:
        model = torch.load(spec, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{spec}: cannot unpickle ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from e
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec}: the pickle holds a {type(model).__name__}, not an nn.Module")
    return model.eval(), identity
