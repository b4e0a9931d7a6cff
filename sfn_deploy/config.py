"""The conversion options as one declarative, validated record (``--config sfn.toml``).

Every option of ``convert`` and ``tune`` has a key here with its type, allowed
values and default; a TOML file may set any of them, command-line flags override
the file, and the converted model stores the effective record.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NoReturn

import tomli

from .errors import UserError
from .fidelity import KINDS as FIDELITY
from .neurons import FIRE_FUNCTIONS, ROUNDINGS, SOFTMAX_LEVELS
from .untrusted import read_bytes

SEARCH_SPACES = ("shared", "per-block", "per-site")
# How the λ search spends its trials (docs/concepts.md "The search strategy"): tpe = the paper's (one TPE study
# over the whole space), staged = shared grid, refinement, then per group, scored on growing image subsets.
# Default: tpe for search = shared (the paper's search, reproducible), staged for per-block and per-site.
STRATEGIES = ("tpe", "staged")

# Validation images for the λ search and the reported drop: all of them up to this many, else a seeded random
# this many. 2,000 images resolve 0.05 points per image and tell a 0.2-point drop from zero (see
# evaluation.resolution); the search runs the SNN over them once per trial (50 trials: 100,000 inferences).
VAL_SIZE = 2000


LEVELS_IF_MISSED = 12      # docs/zoo.md "With M = 12 levels": every trained CIFAR family within a point
# Without --max-drop, convert takes the most accurate point, and its safeguards keep to this drop as they keep
# to a budget (issue 16's goal for convert without search options: within 0.5 point of the ANN): a result
# further below the ANN on the validation images, bias correction included, is searched again at
# LEVELS_IF_MISSED, and bias correction is not kept where it takes the drop past this.
GOAL = 0.5
# Still short after LEVELS_IF_MISSED: one more search with 32 linear levels (M 16, linear fire function: the
# sformer's steps without its coarse tail, top level 32). On well-trained CIFAR CNNs the drop comes from the
# step size and from the values above M·λθ that the tail rounds down; only a finer step with a longer linear
# range removes it, at more energy: +12 to +56 % on the held-out CIFAR CNNs where it ran, ×3.1 on an MNIST CNN
# (docs/benchmarks.md "What the goal costs").
FINE_IF_MISSED = (16, "linear")

# --input-encoding auto gives the input a neuron where the layers reading it hold at least this share of the
# ANN's MACs (an MLP's first layer: 85 %); below it the analog input costs little and quantising a natural image
# costs accuracy (docs/concepts.md "Input encoding").
INPUT_SHARE = 0.1


@dataclass
class ConvertConfig:
    method: str = "sfn"             # sfn | if | mtn | ecmt (pmsm, mbe: not yet); docs/methods.md
    timesteps: int | None = None    # T for the multi-timestep baselines (default per method; sfn: 1)
    v0: float = 0.0                 # if/mtn: initial membrane potential in units of θ (0 classic, 0.5 QCFS)
    epochs: float = 1.0             # pmsm: fine-tune epochs over the conversion data (fractions allowed)
    lr: float = 1e-3                # pmsm: fine-tune learning rate (Adam; 10× for the thresholds)
    levels: int = 8                 # M: linear levels per polarity (2M levels, 4M thresholds in all)
    levels_if_missed: int | None = None  # M to search and correct again with when the result misses `goal`
    #                                     (None: 12 when `levels` was not given, else off; 0: off)
    fine_if_missed: bool | None = None   # then FINE_IF_MISSED when still short (None: on unless `levels` or
    #                                      `fire` was given)
    fire: str = "sformer"           # fire function: sformer | linear | exponential
    rounding: str = "paper"         # firing boundaries: paper (y − 1/2) | nearest (midpoints)
    softmax_levels: str = "dense"   # post-softmax neurons: dense (every integer up to the top level) | fire
    input_encoding: str = "auto"    # analog (the first weight layers read the input: MACs) | spikes (an input
    #                                 neuron on x − min: their work becomes ACs) | auto (spikes where those layers
    #                                 hold INPUT_SHARE of the MACs and the offset folds exactly); docs/concepts.md
    percentile: float = 1.0         # p: θ is the top-p% activation
    scale: float | None = None      # a fixed λ (skips the search)
    tune: bool = True               # search λ (on by default unless scale is given)
    max_drop: float | None = None   # accuracy budget in points: cheapest configuration within it
    trials: int = 50                # search trials (the paper: 50)
    search: str = "shared"          # shared λ | per-block | per-site
    strategy: str | None = None     # tpe | staged (default: tpe for shared, staged otherwise)
    val_size: int = VAL_SIZE        # validation images: all when at most this many, else a random this many
    val_fraction: float | None = None   # instead: a random share of --data (the paper: 0.02); refused with val_size
    check_size: int = VAL_SIZE      # images the search did not choose on that check its chosen point (0: off);
    #                                 the ladder (levels_if_missed, fine_if_missed) climbs on a miss there too
    storage: str | None = None      # Optuna storage URL (default: a SQLite file beside the output)
    study: str | None = None        # Optuna study name (default: derived from model and options)
    seed: int = 0
    batch_size: int = 256
    calib_limit: int | None = None  # use at most this many samples for calibration
    bias_correction: str = "auto"   # auto (with max_drop and a searched λ: search; else kept if validation
    #                                 agreement does not fall, drop within `goal`) | on | off | search (every
    #                                 search trial scored corrected, kept); sfn only. Runs as `correction` says
    fidelity: str = "auto"          # accuracy | output (cosine of the outputs) | auto; capture resolves auto

    @property
    def goal(self) -> float:
        """The drop in points that convert's safeguards keep to (a second search at more levels, bias
        correction's check): the budget, else :data:`GOAL`."""
        return GOAL if self.max_drop is None else self.max_drop

    @property
    def correction(self) -> str:
        """The bias correction that runs: ``auto`` is ``search`` when the λ search has a budget (measured on the
        held-out models: the budget kept as often, the energy lower on most; docs/concepts.md "Bias
        correction"); else the mode given."""
        if self.bias_correction == "auto" and self.max_drop is not None and self.scale is None \
                and self.method == "sfn":
            return "search"
        return self.bias_correction

    def to_dict(self) -> dict:
        """The record saved in converted models and printed: a storage URL's password is never in it."""
        d = asdict(self)
        d["storage"] = redacted(self.storage)
        return d


def redacted(url: str | None) -> str | None:
    """A storage as the user gave it, with a password in a URL replaced by ***."""
    if url is None or "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://")[0] + "://..."


JOURNAL_SUFFIX = ".journal"     # a plain --storage path ending so is an Optuna journal file, not SQLite


def journal_path(url: str | None) -> str | None:
    """The file of an Optuna journal storage: a plain path (no ``://``) ending in ``.journal``, else None."""
    if url and "://" not in url and url.endswith(JOURNAL_SUFFIX):
        return url
    return None


def storage_path(url: str | None) -> str | None:
    """The file behind an Optuna storage, else None (a database server): a plain path (an Optuna journal when
    it ends in ``.journal``, else a SQLite file) or the file of a ``sqlite:///PATH`` URL."""
    if not url:
        return None
    if "://" not in url:
        return url
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):].split("?", 1)[0]
        return path[len("file:"):] if path.startswith("file:") else path or None
    return None


_VAL_KEYS = {"val_size", "val_fraction"}
BIAS_CORRECTION = ("auto", "on", "off", "search")
INPUT_ENCODINGS = ("auto", "analog", "spikes")
_CHOICES = {"fire": FIRE_FUNCTIONS, "rounding": ROUNDINGS, "softmax_levels": SOFTMAX_LEVELS,
            "search": SEARCH_SPACES, "bias_correction": BIAS_CORRECTION, "fidelity": FIDELITY,
            "input_encoding": INPUT_ENCODINGS}


def _bad(key: str, why: str) -> NoReturn:
    raise UserError(f"option '{key}': {why}")


def _check_method_options(cfg: ConvertConfig) -> None:
    """Options whose meaning depends on the method: timesteps, v0, the PMSM training loop."""
    if cfg.timesteps is not None and not 1 <= cfg.timesteps <= 4096:
        _bad("timesteps", f"T must be between 1 and 4096, got {cfg.timesteps}")
    if cfg.v0 and cfg.method not in ("if", "mtn"):
        _bad("v0", f"applies to --method if and mtn only, not {cfg.method}")
    if cfg.method == "if" and not 0 <= cfg.v0 < 1:
        _bad("v0", f"must lie in [0, 1) (units of θ), got {cfg.v0}")
    if cfg.method == "mtn" and cfg.v0 not in (0.0, 0.5):
        _bad("v0", f"the MTN supports v0 = 0 (floor) or 0.5 (round half up), got {cfg.v0}")
    if cfg.method == "mbe" and cfg.timesteps is not None and not 2 <= cfg.timesteps <= 64:
        _bad("timesteps", f"MBE neurons need 2 to 64 internal steps, got {cfg.timesteps}")
    if cfg.method == "pmsm" and cfg.timesteps != 1:
        _bad("timesteps", f"PMSM-R runs one timestep (its T > 1 mode is not implemented), got {cfg.timesteps}")
    if cfg.epochs < 0 or cfg.lr <= 0:
        _bad("epochs" if cfg.epochs < 0 else "lr", f"must be positive, got {cfg.epochs if cfg.epochs < 0 else cfg.lr}")
    if cfg.bias_correction in ("on", "search") and cfg.method != "sfn":
        _bad("bias_correction", f"applies to the SFN method only, not {cfg.method}")
    if cfg.method == "sfn" and cfg.timesteps not in (None, 1):
        _bad("timesteps", f"the SFN method runs one timestep; T = {cfg.timesteps} applies to --method if, mtn, ecmt")


def _check_ranges(cfg: ConvertConfig) -> None:
    """Numeric options of every method: each within its range."""
    if not 1 <= cfg.levels <= 16:
        _bad("levels", f"M must be between 1 and 16, got {cfg.levels}")
    if cfg.levels_if_missed is not None and not 0 <= cfg.levels_if_missed <= 16:
        _bad("levels_if_missed", f"M must be between 1 and 16 (0: off), got {cfg.levels_if_missed}")
    if not 0 <= cfg.percentile < 100:
        _bad("percentile", f"p must lie in [0, 100), got {cfg.percentile}")
    if cfg.scale is not None and not 0 < cfg.scale <= 1:
        _bad("scale", f"λ must lie in (0, 1], got {cfg.scale}")
    if cfg.max_drop is not None and cfg.max_drop < 0:
        _bad("max_drop", f"must be ≥ 0 points, got {cfg.max_drop}")
    if cfg.trials < 1:
        _bad("trials", f"must be ≥ 1, got {cfg.trials}")
    if cfg.val_size < 1:
        _bad("val_size", f"must be ≥ 1 images, got {cfg.val_size}")
    if cfg.check_size < 0:
        _bad("check_size", f"must be ≥ 0 images (0: off), got {cfg.check_size}")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction <= 1:
        _bad("val_fraction", f"must lie in (0, 1], got {cfg.val_fraction}")
    if cfg.batch_size < 1:
        _bad("batch_size", f"must be ≥ 1, got {cfg.batch_size}")
    if cfg.calib_limit is not None and cfg.calib_limit < 1:
        _bad("calib_limit", f"must be ≥ 1, got {cfg.calib_limit}")


def validate(cfg: ConvertConfig) -> ConvertConfig:
    """Refuse a configuration that cannot run, naming the option (UserError)."""
    from .methods import check_method

    check_method(cfg.method)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            _bad(f.name, f"must be a finite number, got {value}")
    _check_method_options(cfg)
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            _bad(key, f"{getattr(cfg, key)!r} is not one of {', '.join(choices)}")
    if cfg.strategy is not None and cfg.strategy not in STRATEGIES:
        _bad("strategy", f"{cfg.strategy!r} is not one of {', '.join(STRATEGIES)}")
    _check_ranges(cfg)
    return cfg


def _typecheck(key: str, value, typ) -> object:
    want: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}
    base = typ.replace(" | None", "")
    if value is None and "None" in typ:
        return None
    ok = isinstance(value, want[base]) and not (base in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise UserError(f"option '{key}': expected {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value


def _read_toml(path: str) -> dict:
    """The options of a config file: top-level keys, or one [convert] table; any other key or table is refused."""
    blob = read_bytes(path, "config file")
    try:
        raw = tomli.loads(blob.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a TOML config file (not UTF-8 text)") from None
    except tomli.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from e
    if "convert" not in raw:
        return raw
    if not isinstance(raw["convert"], dict):
        raise UserError(f"{path}: 'convert' must be a table ([convert]), got {type(raw['convert']).__name__}")
    other = [k for k in raw if k != "convert"]
    if other:
        kind = "section" if isinstance(raw[other[0]], dict) else "key"
        raise UserError(f"{path}: unknown {kind} '{other[0]}' (a config file holds the [convert] table's options, "
                        "which convert and tune read)")
    return raw["convert"]


def load_config(path: str, overrides: dict) -> ConvertConfig:
    """Read a TOML file (optional), apply command-line overrides, validate. Unknown keys are errors."""
    values: dict = {}
    types = {f.name: f.type for f in fields(ConvertConfig)}
    if path:
        for key, value in _read_toml(path).items():
            k = key.replace("-", "_")
            if k in DATA_KEYS:          # the data's preprocessing: read_data_options
                continue
            if k not in types:
                raise UserError(f"{path}: unknown key '{key}' (known: {', '.join(sorted([*types, *DATA_KEYS]))})")
            values[k] = _typecheck(key, value, types[k])
    given = {k: v for k, v in overrides.items() if k in types}
    if given.keys() & _VAL_KEYS:          # a flag sizing the validation set replaces the file's way of sizing it
        values = {k: v for k, v in values.items() if k not in _VAL_KEYS}
    values.update(given)
    if {k for k, v in values.items() if v is not None} >= _VAL_KEYS:
        raise UserError("options 'val_size' and 'val_fraction' both size the validation set; give one "
                        "(val_size: a number of images, the default rule; val_fraction: a share of --data)")
    cfg = ConvertConfig(**values)
    if cfg.levels_if_missed is None:     # the measured second try (docs/concepts.md), unless M was chosen
        cfg.levels_if_missed = LEVELS_IF_MISSED if values.get("levels") is None else 0
    if cfg.fine_if_missed is None:       # the finer last try changes M and the fire function: not a chosen one
        cfg.fine_if_missed = values.get("levels") is None and values.get("fire") is None
    if cfg.scale is not None and (values.get("tune") is True or cfg.max_drop is not None):
        raise UserError("option 'scale' fixes λ; it cannot be combined with 'tune' or 'max_drop'")
    if cfg.scale is not None and "tune" not in values:
        cfg.tune = False
    if cfg.max_drop is not None:
        cfg.tune = True
    if cfg.method != "sfn":
        _method_defaults(cfg, values)
    return validate(cfg)


def _method_defaults(cfg: ConvertConfig, values: dict) -> None:
    """A baseline has no λ search: refuse the λ options, and fill the options it defaults differently."""
    from .methods import DEFAULTS, check_method
    check_method(cfg.method)
    given = [k for k in ("scale", "max_drop") if values.get(k) is not None] + \
        (["tune"] if values.get("tune") is True else [])
    if given:
        raise UserError(f"option '{given[0]}' sets the SFN scale factor λ; --method {cfg.method} has no λ "
                        f"(use --method sfn)")
    cfg.tune = False
    for key, value in DEFAULTS[cfg.method].items():
        if key not in values:
            setattr(cfg, key, value)


# Keys of a config file that say how the data is read (docs/data.md), not how the network is converted: they are
# not ConvertConfig fields (a converted model records the preprocessing it used on its own, ``preprocessing``).
DATA_KEYS = ("resize", "crop", "mean", "std", "interpolation", "channels", "workers")


def read_data_options(path: str | None) -> dict:
    """The data keys of a config file, as written (the CLI checks them with the flags: preprocess.parse_options)."""
    if not path:
        return {}
    return {key.replace("-", "_"): value for key, value in _read_toml(path).items()
            if key.replace("-", "_") in DATA_KEYS}
