"""How pictures become model inputs: resize, centre crop, [0, 1] scaling, mean/std (docs/data.md).

A :class:`Preprocess` is the whole recipe, as plain data. ``convert`` records the one it used in the
converted model (``preprocessing``), and ``evaluate``, ``simulate``, ``report``, ``tune`` and the exports
reuse it, so a later folder of photos reaches the network exactly as the calibration photos did.

Where the recipe comes from, in order:

1. a recipe recorded in the converted model (:func:`plan` with ``recorded``): options may not change how
   pixel values map to inputs (channels, mean, std): a different value is refused naming both;
   resize/crop may be added only when the record has no geometry (the model's input size is checked);
2. for ``timm:`` models, the model's pretrained data config (:func:`timm_defaults`: timm's
   ``resolve_model_data_config``: input size, ``crop_pct``, interpolation, mean, std), each field
   overridden by an option;
3. the options (``--resize --crop --mean --std --interpolation --channels`` or the same TOML keys).

Images are decoded by PIL and transformed exactly as timm's evaluation transform does it (``Resize`` of
the shorter side on the PIL image, ``CenterCrop``, ``ToTensor``, ``Normalize``); tensors of an ``.npz`` or
``mnist:`` source are already model inputs and get only the options given explicitly
(:func:`apply_to_tensors`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import UserError

VERSION = 1
# the resampling filters PIL applies when resizing (timm's names); tensors support the first three only
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
KEYS = ("resize", "crop", "mean", "std", "interpolation", "channels")
VALUE_KEYS = ("channels", "mean", "std")           # how pixel values map to inputs: must match a record
GEOMETRY_KEYS = ("resize", "crop", "interpolation")
MAX_SIDE = 16384                                     # pixels: a resize or crop beyond this is a typo


@dataclass(frozen=True)
class Preprocess:
    """One preprocessing recipe. ``resize``: ``(n,)`` scales the shorter side to n pixels (aspect kept),
    ``(h, w)`` scales to exactly h×w; ``crop``: the centre h×w; ``mean``/``std``: per channel (one value
    each, or one for all), applied after scaling pixels to [0, 1]; ``channels``: 1 (greyscale) or 3 (RGB),
    what every image is converted to. None: that step is not applied (channels None: not decided yet,
    see :meth:`with_channels`). ``origin``: where the values came from (for people; never read back)."""
    channels: int | None = None
    resize: tuple[int, ...] | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    origin: str = field(default="options", compare=False)

    # ------------------------------------------------------------------ plain data

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "channels": self.channels,
                "resize": None if self.resize is None else list(self.resize),
                "crop": None if self.crop is None else list(self.crop), "interpolation": self.interpolation,
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "origin": self.origin}

    @classmethod
    def from_dict(cls, d: Any) -> Preprocess:
        """A recorded recipe (from an untrusted file): every key and value checked; ValueError says what is
        wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"is a {type(d).__name__}, not a dict")
        unknown = sorted(str(k) for k in d if k not in (*KEYS, "version", "origin"))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}")
        v = d.get("version")
        if type(v) is not int or v < 1:
            raise ValueError(f"'version' {v!r} is not a positive integer")
        if v > VERSION:
            raise ValueError(f"version {v} is newer than this sfn-deploy reads ({VERSION}); upgrade sfn-deploy")
        origin = d.get("origin", "")
        if not isinstance(origin, str):
            raise ValueError("'origin' is not text")
        values = {k: d.get(k) for k in KEYS if d.get(k) is not None}
        try:
            return cls(origin=origin, **parse_options(values, "")).check("")
        except UserError as e:
            raise ValueError(str(e).removeprefix(": ")) from None

    # ------------------------------------------------------------------ checks and descriptions

    def check(self, where: str = "preprocessing") -> Preprocess:
        """Refuse a recipe that cannot produce one input size or whose mean/std do not fit the channels."""
        if self.resize is not None and self.crop is not None:
            small = (min(self.resize) < max(self.crop) if len(self.resize) == 1 else
                     self.resize[0] < self.crop[0] or self.resize[1] < self.crop[1])
            if small:
                raise UserError(f"{where}: resize {_size(self.resize)} is smaller than crop {_size(self.crop)} "
                                "(the crop would be padded with black)")
        for key in ("mean", "std"):
            vals = getattr(self, key)
            if vals is not None and self.channels is not None and len(vals) not in (1, self.channels):
                raise UserError(f"{where}: {key} has {len(vals)} values for {self.channels} channel(s) (give one "
                                "value per channel, or one for all)")
        if (self.mean is None) != (self.std is None):
            raise UserError(f"{where}: give mean and std together (or neither)")
        return self

    def with_channels(self, channels: int) -> Preprocess:
        return self if self.channels == channels else replace(self, channels=channels).check()

    @property
    def size(self) -> tuple[int, int] | None:
        """The h×w every image has after the recipe; None when it keeps each image's own size (or only its
        shorter side is set)."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and len(self.resize) == 2:
            return (self.resize[0], self.resize[1])
        return None

    def describe(self) -> str:
        """``3 channels, resize 40 (bicubic), centre crop 32×32, mean 0.49,0.48,0.45 std 0.25,0.24,0.26``."""
        parts = [f"{self.channels or '?'} channel{'s' if self.channels != 1 else ''}"]
        if self.resize is not None:
            side = "shorter side " if len(self.resize) == 1 else ""
            parts.append(f"resize {side}{_size(self.resize)} ({self.interpolation})")
        if self.crop is not None:
            parts.append(f"centre crop {_size(self.crop)}")
        parts.append("pixels scaled to [0, 1]")
        if self.mean is not None and self.std is not None:
            parts.append(f"mean {_floats(self.mean)} std {_floats(self.std)}")
        return ", ".join(parts)

    def steps(self) -> list[str]:
        return [k for k in ("resize", "crop", "mean") if getattr(self, k) is not None]


def _size(v) -> str:
    return "×".join(map(str, v))


def _floats(v) -> str:
    return ",".join(f"{x:g}" for x in v)


# ---------------------------------------------------------------- options (command line and TOML)

def _ints(key: str, value, where: str) -> tuple[int, ...] | None:
    items = _items(key, value, where)
    if items is None:
        return None
    if len(items) not in (1, 2):
        raise UserError(f"{where}{key}: expected N or H,W, got {len(items)} values")
    out = []
    for it in items:
        if isinstance(it, bool) or not (isinstance(it, int) or (isinstance(it, str) and it.strip().isdigit())):
            raise UserError(f"{where}{key}: {it!r} is not a whole number of pixels")
        n = int(it)
        if not 1 <= n <= MAX_SIDE:
            raise UserError(f"{where}{key}: {n} pixels is outside 1..{MAX_SIDE}")
        out.append(n)
    return tuple(out)


def _floats_of(key: str, value, where: str) -> tuple[float, ...] | None:
    items = _items(key, value, where)
    if items is None:
        return None
    if not 1 <= len(items) <= 4:
        raise UserError(f"{where}{key}: expected 1 to 4 values (one per channel), got {len(items)}")
    out = []
    for it in items:
        try:
            if isinstance(it, bool):
                raise ValueError
            x = float(it)
        except (TypeError, ValueError):
            raise UserError(f"{where}{key}: {it!r} is not a number") from None
        if not math.isfinite(x) or (key == "std" and x <= 0):
            raise UserError(f"{where}{key}: {it!r} must be a finite number{' above 0' if key == 'std' else ''}")
        out.append(x)
    return tuple(out)


def _items(key: str, value, where: str) -> list | None:
    """'256', '256,320', 256, [256, 320] → a list of items; 'none' → None (the step is switched off)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "none":
            return None
        return [t.strip() for t in text.split(",")]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise UserError(f"{where}{key}: expected a number, a comma-separated list or 'none', got "
                    f"{type(value).__name__} {value!r}")


def parse_options(raw: dict, where: str = "--") -> dict:
    """Typed values of the preprocessing options given (command-line text or TOML values); only the keys
    present. ``where`` prefixes the key in messages (``--`` for flags, ``FILE: option '`` for files)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise UserError(f"{where}{key}: not a preprocessing option ({', '.join(KEYS)})")
        if key in ("resize", "crop"):
            size = _ints(key, value, where)
            out[key] = size if size is None or key == "resize" or len(size) == 2 else (size[0], size[0])
        elif key in ("mean", "std"):
            out[key] = _floats_of(key, value, where)
        elif key == "interpolation":
            if not isinstance(value, str) or value.lower() not in INTERPOLATIONS:
                raise UserError(f"{where}{key}: {value!r} is not one of {', '.join(INTERPOLATIONS)}")
            out[key] = value.lower()
        else:
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if type(value) is not int or value not in (1, 3):
                raise UserError(f"{where}{key}: {value!r} is not 1 (greyscale) or 3 (RGB)")
            out[key] = value
    return out


# ---------------------------------------------------------------- timm's data config

def _first_conv_channels(model) -> int | None:
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return None


def timm_defaults(model, name: str, options: dict) -> Preprocess:
    """The recipe of a timm model's pretrained data config, each field overridden by an option.

    timm's evaluation transform resizes the shorter side to ``floor(size / crop_pct)`` and crops the centre
    ``size``: a ``--crop`` without ``--resize`` keeps that ratio. A ViT built for another size
    (``--model-args img_size=32``) crops its own size, and the channels are the first convolution's."""
    from timm.data import resolve_model_data_config
    cfg = resolve_model_data_config(model)
    c, h, w = (int(v) for v in cfg["input_size"])
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        h, w = int(fixed[0]), int(fixed[1])
    channels = options.get("channels") or _first_conv_channels(model) or c
    crop = options.get("crop", (h, w))
    pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    if "resize" in options:
        resize = options["resize"]
    elif crop is None:
        resize = None
    elif mode == "squash":
        resize = (math.floor(crop[0] / pct), math.floor(crop[1] / pct))
    elif crop[0] == crop[1]:
        resize = (math.floor(crop[0] / pct),)
    else:
        raise UserError(f"timm:{name}: its data config crops a non-square {crop[0]}×{crop[1]} ({mode} mode); "
                        "give --resize and --crop")
    interp = cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bilinear"
    mean = options["mean"] if "mean" in options else tuple(float(v) for v in cfg["mean"])
    std = options["std"] if "std" in options else tuple(float(v) for v in cfg["std"])
    for key, vals in (("mean", mean), ("std", std)):
        if key not in options and vals is not None and len(vals) not in (1, channels):
            raise UserError(f"timm:{name}: its data config has {len(vals)} {key} values but the model takes "
                            f"{channels} channel(s); give --mean and --std")
    given = [k for k in KEYS if k in options]
    origin = f"timm:{name} pretrained data config (crop_pct {pct:g}, {mode})" + (
        f"; {', '.join(given)} from options" if given else "")
    return Preprocess(channels=channels, resize=resize, crop=crop,
                      interpolation=options.get("interpolation", interp), mean=mean, std=std,
                      origin=origin).check(f"timm:{name}")


# ---------------------------------------------------------------- choosing the recipe

def from_options(options: dict, origin: str = "options") -> Preprocess:
    return Preprocess(origin=origin, **options).check("preprocessing options")


def plan(options: dict, *, defaults: Preprocess | None = None, recorded: Preprocess | None = None,
         recorded_in: str = "the converted model") -> Preprocess:
    """The recipe for image sources. With a ``recorded`` recipe: the record, with the options checked
    against it (a value that differs is refused, naming both) and geometry added where the record has none;
    else ``defaults`` (timm's, already merged with the options) or the options alone."""
    if recorded is None:
        return defaults if defaults is not None else from_options(options)
    record = recorded.to_dict()
    has_geometry = recorded.resize is not None or recorded.crop is not None
    for key, value in options.items():
        if key in GEOMETRY_KEYS and not has_geometry:
            continue
        mine = Preprocess(**{key: value}).to_dict()[key]
        if mine != record[key]:
            raise UserError(f"--{key} {_show(mine)} differs from the preprocessing recorded in {recorded_in} "
                            f"({key} {_show(record[key])}); the network was calibrated on those inputs "
                            "(convert again to change it)")
    if has_geometry:
        return recorded
    geometry = {k: v for k, v in options.items() if k in GEOMETRY_KEYS}
    return replace(recorded, **geometry).check() if geometry else recorded


def _show(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, list) and all(type(x) is int for x in v):
        return "×".join(map(str, v))                # a size: 40 (shorter side), 32×32
    if isinstance(v, list):
        return ",".join(f"{x:g}" for x in v)
    return str(v)


# ---------------------------------------------------------------- applying it

def _per_channel(vals: tuple[float, ...] | None, channels: int) -> list[float] | None:
    """One value per channel (a single value stands for all)."""
    return None if vals is None else list(vals) * channels if len(vals) == 1 else list(vals)


def image_transform(p: Preprocess):
    """PIL image (already in the recipe's mode: L or RGB) → float32 C×H×W tensor, as timm's eval transform."""
    import numpy as np
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(p.interpolation)
    mean, std = _per_channel(p.mean, p.channels or 1), _per_channel(p.std, p.channels or 1)

    def run(img):
        if p.resize is not None:
            img = F.resize(img, list(p.resize), interpolation=mode)
        if p.crop is not None:
            img = F.center_crop(img, list(p.crop))
        arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        x = t.float().div(255)                      # torchvision's ToTensor, as timm uses it
        if mean is not None and std is not None:
            x = F.normalize(x, mean, std)
        return x.contiguous()
    return run


def apply_to_tensors(x: torch.Tensor, options: dict, name: str) -> torch.Tensor:
    """The preprocessing options given for a tensor source (N×C×H×W, already model inputs): resize, crop,
    mean/std, in that order. Channels cannot be converted: a different count is refused."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    p = from_options(options).with_channels(options.get("channels", x.shape[1]))
    if p.channels != x.shape[1]:
        raise UserError(f"{name}: samples have {x.shape[1]} channel(s), --channels asks for {p.channels} "
                        "(a tensor source is not converted between greyscale and RGB)")
    if p.resize is not None or p.crop is not None:
        if p.interpolation not in TENSOR_INTERPOLATIONS:
            raise UserError(f"{name}: --interpolation {p.interpolation} applies to images only; tensors are "
                            f"resized with {', '.join(TENSOR_INTERPOLATIONS)}")
        if p.resize is not None:
            x = F.resize(x, list(p.resize), interpolation=InterpolationMode(p.interpolation), antialias=True)
        if p.crop is not None:
            if x.shape[-2] < p.crop[0] or x.shape[-1] < p.crop[1]:
                raise UserError(f"{name}: samples are {x.shape[-2]}×{x.shape[-1]}, smaller than crop "
                                f"{_size(p.crop)}")
            x = F.center_crop(x, list(p.crop))
    mean, std = _per_channel(p.mean, x.shape[1]), _per_channel(p.std, x.shape[1])
    if mean is not None and std is not None:
        x = F.normalize(x, mean, std)
    return x.contiguous()
