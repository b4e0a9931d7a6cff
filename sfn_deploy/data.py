"""Data sets for calibration, tuning and evaluation (SPEC §6 "Data in").

Accepted: an ``.npz`` with ``x`` (float32, N×C×H×W, normalised as the model expects)
and ``y`` (int64, N); a directory of class folders of images; ``sklearn:digits``;
``mnist:DIR`` (the IDX files of the MNIST release; ``mnist:DIR[:a:b]`` selects
images a..b-1). Every problem is a :class:`UserError` naming the file and the field.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import UserError
from .results import Result
from .untrusted import regular_file

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Validation(Result):
    """Which images scored the λ search and the converted model's validation figures (recorded in both)."""
    source: str             # "data": drawn from the calibration images (--data); "val-data": --val-data's
    data: str               # that data set's name
    rule: str               # "all" | "random subset" (--val-size, the default) | "fraction" (--val-fraction)
    samples: int            # images used
    available: int          # images the rule drew from
    seed: int


@dataclass
class Dataset:
    x: torch.Tensor     # float32, N×C×H×W
    y: torch.Tensor     # int64, N
    name: str
    # images kept apart for validation (--val-data); None: validation is drawn from this set itself
    validation: Dataset | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, size: int = 256):
        for i in range(0, len(self), size):
            yield self.x[i:i + size]

    def subset(self, idx) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.name)

    def limit(self, n: int | None) -> Dataset:
        return self if n is None or n >= len(self) else Dataset(self.x[:n], self.y[:n], f"{self.name}[:{n}]")

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A random validation part of the given fraction (at least one sample) and the rest."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        k = max(1, int(round(fraction * len(self))))
        return self.subset(perm[:k]), self.subset(perm[k:])

    def sample(self, n: int, seed: int = 0) -> Dataset:
        """All of the set when it has at most ``n`` samples, else a seeded random ``n`` of them (the first n of
        the permutation :meth:`split` draws from, so a smaller sample is part of a larger one)."""
        if n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return Dataset(self.x[perm[:n]], self.y[perm[:n]], f"{self.name}[random {n} of {len(self)}]")

    def with_validation(self, val: Dataset) -> Dataset:
        """This set with ``val`` kept apart for validation (``--val-data``); the sample shapes must match."""
        if list(val.x.shape[1:]) != list(self.x.shape[1:]):
            shape = "×".join(map(str, val.x.shape[1:]))
            raise UserError(f"{val.name}: validation samples have shape {shape} but the calibration data's "
                            f"({self.name}) are {'×'.join(map(str, self.x.shape[1:]))}")
        return Dataset(self.x, self.y, self.name, validation=val)

    def validation_split(self, size: int, fraction: float | None = None, seed: int = 0) -> tuple[Dataset, Validation]:
        """The images that validate a conversion, and the record of how they were chosen.

        Drawn from :attr:`validation` when set (``--val-data``), else from this set. The count rule (the
        default): all of them when there are at most ``size``, else a seeded random ``size``. With
        ``fraction`` (``--val-fraction``, this set only): the random share :meth:`split` gives.
        """
        pool, source = (self, "data") if self.validation is None else (self.validation, "val-data")
        if fraction is not None:
            if self.validation is not None:
                raise UserError("--val-fraction takes a share of --data; with --val-data, size the validation "
                                "set with --val-size")
            val, rule = self.split(fraction, seed)[0], "fraction"
        else:
            val = pool.sample(size, seed)
            rule = "all" if len(val) == len(pool) else "random subset"
        return val, Validation(source=source, data=pool.name, rule=rule, samples=len(val), available=len(pool),
                               seed=seed)


def _check(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
    if x.ndim != 4:
        raise UserError(f"{name}: 'x' must have shape N×C×H×W, got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"{name}: 'y' must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise UserError(f"{name}: the data set is empty")
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{name}: 'x' must be floating point (normalised), got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{name}: 'y' must be integer class labels, got {y.dtype}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        raise UserError(f"{name}: 'x' contains NaN or infinite values in {bad} sample(s)")
    if (y < 0).any():
        raise UserError(f"{name}: 'y' contains negative labels")
    return Dataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                   torch.from_numpy(y.astype(np.int64)), name)


def load_npz(path: str) -> Dataset:
    regular_file(path, ".npz data file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise UserError(f"{path}: missing key(s) {', '.join(missing)} (found: {', '.join(f.files) or 'none'})")
            x, y = f["x"], f["y"]
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    return _check(x, y, path)


DIGITS_INSTALL = "pip install 'sfn-deploy[digits]'"


def load_digits() -> Dataset:
    """scikit-learn's 8×8 digits (an optional dependency: the extra ``sfn-deploy[digits]``)."""
    try:
        from sklearn.datasets import load_digits as _digits
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "sklearn":
            raise  # scikit-learn is there but broken: its own error says why
        raise UserError(f"sklearn:digits needs scikit-learn, which is not installed: {DIGITS_INSTALL}") from None
    d = _digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return _check(x, d.target.astype(np.int64), "sklearn:digits")


def _read_idx(path: str) -> np.ndarray:
    regular_file(path, "IDX file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from e
    if len(data) < 8:
        raise UserError(f"{path}: truncated IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UserError(f"{path}: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist(directory: str, start: int = 0, stop: int | None = None) -> Dataset:
    """MNIST from the release's IDX files, scaled to [0, 1] and normalised with the usual mean/std."""
    def find(stem):
        for name in (stem + ".gz", stem):
            p = os.path.join(directory, name)
            if os.path.exists(p):
                return p
        raise UserError(f"{directory}: no {stem}[.gz] file")
    images = _read_idx(find("t10k-images-idx3-ubyte"))[start:stop]
    labels = _read_idx(find("t10k-labels-idx1-ubyte"))[start:stop]
    x = ((images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
    return _check(x, labels.astype(np.int64), f"mnist:{directory}[{start}:{'' if stop is None else stop}]")


def load_image_folder(path: str) -> Dataset:
    from PIL import Image
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise UserError(f"{path}: no class folders found")
    xs, ys, size = [], [], None
    for label, cls in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(path, cls))):
            if not fname.lower().endswith(IMAGE_EXT):
                continue
            fp = regular_file(os.path.join(path, cls, fname), "image file")
            try:
                with Image.open(fp) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"), dtype=np.float32)
            except Exception as e:
                raise UserError(f"{fp}: not a readable image ({e})") from e
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise UserError(f"{fp}: image shape {arr.shape} differs from the first image's {size}")
            xs.append(arr / 255.0)
            ys.append(label)
    if not xs:
        raise UserError(f"{path}: no images found in the class folders")
    return _check(np.stack(xs), np.array(ys, dtype=np.int64), path)


def data_paths(spec: str | None) -> list[str]:
    """The files or folders a ``--data`` spec reads."""
    if not spec or spec.startswith("sklearn:"):
        return []
    if spec.startswith("mnist:"):
        return [spec[len("mnist:"):].split(":")[0]]
    return [spec]


def load_data(spec: str) -> Dataset:
    """Load a data set from a path or a built-in name (see module docstring)."""
    if spec == "sklearn:digits":
        return load_digits()
    if spec.startswith("mnist:"):
        parts = spec[len("mnist:"):].split(":")
        try:
            if len(parts) > 3:
                raise ValueError
            start = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            stop = int(parts[2]) if len(parts) > 2 and parts[2] else None
            if start < 0 or (stop is not None and stop <= start):
                raise ValueError
        except ValueError:
            raise UserError(f"{spec}: expected mnist:DIR[:START:STOP] with integer bounds 0 ≤ START < STOP") from None
        return load_mnist(parts[0], start, stop)
    if os.path.isdir(spec):
        return load_image_folder(spec)
    if spec.endswith(".npz"):
        return load_npz(spec)
    if not os.path.exists(spec):
        raise UserError(f"{spec}: no such file or directory")
    raise UserError(f"{spec}: unknown data format (expected .npz, an image folder, sklearn:digits or mnist:DIR)")
