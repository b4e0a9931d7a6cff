"""The conversion options as one declarative, validated record (``--config sfn.toml``).

Every option of ``convert`` and ``tune`` has a key here with its type, allowed
values and default; a TOML file may set any of them, command-line flags override
the file, and the converted model stores the effective record.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import tomli

from .errors import UserError
from .neurons import FIRE_FUNCTIONS, ROUNDINGS

SEARCH_SPACES = ("shared", "per-block", "per-site")


@dataclass
class ConvertConfig:
    levels: int = 8                 # M: linear levels per polarity (2M levels, 4M thresholds in all)
    fire: str = "sformer"           # fire function: sformer | linear | exponential
    rounding: str = "paper"         # firing boundaries: paper (y − 1/2) | nearest (midpoints)
    percentile: float = 1.0         # p: θ is the top-p% activation
    scale: float | None = None      # a fixed λ (skips the search)
    tune: bool = True               # search λ (on by default unless scale is given)
    max_drop: float | None = None   # accuracy budget in points: cheapest configuration within it
    trials: int = 50                # search trials (the paper: 50)
    search: str = "shared"          # shared λ | per-block | per-site
    val_fraction: float = 0.02      # validation split for the search (the paper: 2 %)
    storage: str | None = None      # Optuna storage URL (default: a SQLite file beside the output)
    study: str | None = None        # Optuna study name (default: derived from model and options)
    seed: int = 0
    batch_size: int = 256
    calib_limit: int | None = None  # use at most this many samples for calibration

    def to_dict(self) -> dict:
        return asdict(self)


_CHOICES = {"fire": FIRE_FUNCTIONS, "rounding": ROUNDINGS, "search": SEARCH_SPACES}


def validate(cfg: ConvertConfig) -> ConvertConfig:
    def bad(key, why):
        raise UserError(f"option '{key}': {why}")
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            bad(key, f"{getattr(cfg, key)!r} is not one of {', '.join(choices)}")
    if not 1 <= cfg.levels <= 16:
        bad("levels", f"M must be between 1 and 16, got {cfg.levels}")
    if not 0 <= cfg.percentile < 100:
        bad("percentile", f"p must lie in [0, 100), got {cfg.percentile}")
    if cfg.scale is not None and not 0 < cfg.scale <= 1:
        bad("scale", f"λ must lie in (0, 1], got {cfg.scale}")
    if cfg.max_drop is not None and cfg.max_drop < 0:
        bad("max_drop", f"must be ≥ 0 points, got {cfg.max_drop}")
    if cfg.trials < 1:
        bad("trials", f"must be ≥ 1, got {cfg.trials}")
    if not 0 < cfg.val_fraction <= 1:
        bad("val_fraction", f"must lie in (0, 1], got {cfg.val_fraction}")
    if cfg.batch_size < 1:
        bad("batch_size", f"must be ≥ 1, got {cfg.batch_size}")
    if cfg.calib_limit is not None and cfg.calib_limit < 1:
        bad("calib_limit", f"must be ≥ 1, got {cfg.calib_limit}")
    return cfg


def _typecheck(key: str, value, typ) -> object:
    want = {"int": int, "float": (int, float), "str": str, "bool": bool}
    base = typ.replace(" | None", "")
    if value is None and "None" in typ:
        return None
    ok = isinstance(value, want[base]) and not (base in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise UserError(f"option '{key}': expected {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value


def load_config(path: str, overrides: dict) -> ConvertConfig:
    """Read a TOML file (optional), apply command-line overrides, validate. Unknown keys are errors."""
    values: dict = {}
    types = {f.name: f.type for f in fields(ConvertConfig)}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomli.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file")
        except tomli.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})")
        raw = raw.get("convert", raw)
        for key, value in raw.items():
            k = key.replace("-", "_")
            if k not in types:
                raise UserError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(types))})")
            values[k] = _typecheck(key, value, types[k])
    values.update({k: v for k, v in overrides.items() if k in types})
    cfg = ConvertConfig(**values)
    if cfg.scale is not None and (values.get("tune") is True or cfg.max_drop is not None):
        raise UserError("option 'scale' fixes λ; it cannot be combined with 'tune' or 'max_drop'")
    if cfg.scale is not None and "tune" not in values:
        cfg.tune = False
    if cfg.max_drop is not None:
        cfg.tune = True
    return validate(cfg)
