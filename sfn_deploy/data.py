"""Data sets for calibration, tuning and evaluation (SPEC §6 "Data in", docs/data.md).

Accepted: an ``.npz`` with ``x`` (float32, N×C×H×W images, N×C×L signals or N×F features, normalised as the
model expects)
and ``y`` (int64, N); a folder of class folders of images (ImageNet layout), or of images
alone (unlabeled); a ``.csv``/``.tsv`` list of ``path,label`` (or of paths alone); ``sklearn:digits``;
``mnist:DIR`` (the IDX files of the MNIST release; ``mnist:DIR[:a:b]`` selects
images a..b-1). Every problem is a :class:`UserError` naming the file and the field.

:func:`open_source` gives a :class:`~sfn_deploy.sources.Source` (batches from a DataLoader for images,
with the preprocessing of :mod:`sfn_deploy.preprocess`); :func:`load_data` wraps it in a :class:`Dataset`:
tensors in memory, image files streamed (decoded one batch at a time by every consumer).
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import UserError
from .preprocess import Preprocess, apply_to_tensors, plan
from .progress import progress
from .results import Result
from .sources import (
    DEFAULT_WORKERS,
    IMAGE_EXT,
    NO_LABEL,
    ImageSource,
    Listing,
    Source,
    TensorSource,
    list_folder,
    list_table,
    probe_channels,
)
from .untrusted import regular_file

__all__ = ["DEFAULT_WORKERS", "IMAGE_EXT", "NO_LABEL", "Dataset", "Validation", "load_data", "open_source",
           "as_dataset", "data_paths", "is_image_spec", "check_not_read"]
LIST_EXT = (".csv", ".tsv")


@dataclass
class Validation(Result):
    """Which images scored the λ search and the converted model's validation figures (recorded in both)."""
    source: str             # "data": drawn from the calibration images (--data); "val-data": --val-data's
    data: str               # that data set's name
    rule: str               # "all" | "random subset" (--val-size, the default) | "fraction" (--val-fraction)
    samples: int            # images used
    available: int          # images the rule drew from
    seed: int


class Dataset:
    """Samples with their labels: in memory (``x``, a tensor: ``.npz``, ``mnist:``, ``sklearn:digits``) or
    streamed from image files (``files``: decoded batch by batch, never all at once; docs/data.md, "Streaming").

    ``y`` (int64, N; NO_LABEL (-1) for every sample of an unlabeled source) is always in memory: for image
    files it comes from the listing, without decoding. Subsets, limits and samples of a streamed set are
    streamed too (they select files). Consumers read :meth:`batches`, :attr:`sample_shape` and :meth:`head`;
    ``x`` exists only for a set in memory, and :meth:`in_memory` decodes a (bounded) streamed set when a
    consumer needs random access (the λ search's validation images, Lava's one stream, PMSM's fine-tune).
    """

    def __init__(self, x: torch.Tensor | None, y: torch.Tensor, name: str, validation: Dataset | None = None,
                 preprocessing: Preprocess | None = None, classes: list[str] | None = None,
                 files: ImageSource | None = None):
        if (x is None) == (files is None):
            raise ValueError("a Dataset is either in memory (x) or streamed (files)")
        self._x, self.y, self.name = x, y, name
        self.validation = validation        # kept apart for validation (--val-data); None: drawn from this set
        self.preprocessing = preprocessing  # how pixels became x (recorded by convert; None: unknown origin)
        self.classes = classes              # label names
        self.files = files                  # the image files, in the order of y (streamed sets)
        self._shape: list[int] | None = None if x is None else [int(s) for s in x.shape[1:]]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} samples, {'streamed' if self.streamed else 'in memory'})"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def streamed(self) -> bool:
        return self.files is not None

    @property
    def x(self) -> torch.Tensor:
        """All samples as one tensor (sets in memory only: a streamed set is read with :meth:`batches`)."""
        if self._x is None:
            raise RuntimeError(f"{self.name} is streamed from image files: read it with batches(), or decode a "
                               "bounded part with in_memory()")
        return self._x

    @property
    def labeled(self) -> bool:
        """False for an unlabeled source (accuracy cannot be measured on it)."""
        return not bool((self.y < 0).any())

    @property
    def sample_shape(self) -> list[int]:
        """C, H, W of one sample (a streamed set decodes its first image once to know it)."""
        if self._shape is None:
            self._shape = [int(s) for s in self.head(1).shape[1:]]
        return list(self._shape)

    def labeled_batches(self, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) one batch at a time, in order."""
        if self._x is not None:
            for i in range(0, len(self), size):
                yield self._x[i:i + size], self.y[i:i + size]
            return
        assert self.files is not None
        at = 0
        for xb, _ in self.files.batches(size):
            if self._shape is None:
                self._shape = [int(s) for s in xb.shape[1:]]
            yield xb, self.y[at:at + len(xb)]
            at += len(xb)

    def batches(self, size: int = 256) -> Iterator[torch.Tensor]:
        for xb, _ in self.labeled_batches(size):
            yield xb

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` samples as a tensor (capture traces the model on two)."""
        x = self.x[:n] if self._x is not None else self.limit(n).in_memory().x
        self._shape = [int(s) for s in x.shape[1:]]
        return x

    def abs_max(self, batch_size: int = 256) -> float:
        """max |x| over the set (the fixed-point input range), one batch at a time."""
        return max((float(xb.abs().max()) for xb in self.batches(batch_size)), default=0.0)

    def in_memory(self, batch_size: int = 64, quiet: bool = True) -> Dataset:
        """This set with every sample decoded into one tensor (itself when already in memory). Memory grows
        with its size: callers use it on bounded sets only (a --limit, the search's --val-size images)."""
        if self._x is not None:
            return self
        x: torch.Tensor | None = None
        at = 0
        for xb in progress(self.batches(batch_size), f"reading {self.name}", quiet=quiet,
                           total=-(-len(self) // batch_size)):
            if x is None:
                x = torch.zeros(len(self), *xb.shape[1:], dtype=torch.float32)
            x[at:at + len(xb)] = xb
            at += len(xb)
        assert x is not None and at == len(self)
        return self._with(x=x, files=None)

    def fingerprint(self) -> str:
        """A hash of the samples (in memory: their values; streamed: the files' paths, sizes and modification
        times, and the preprocessing) and labels: names a search's validation set without decoding it."""
        h = hashlib.sha256()
        if self._x is not None:
            h.update(self._x.numpy().tobytes())
        else:
            assert self.files is not None
            for path, _ in self.files.items:
                st = os.stat(path)
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            h.update(json.dumps(self.preprocessing.to_dict() if self.preprocessing else None,
                                sort_keys=True).encode())
        h.update(self.y.numpy().tobytes())
        return h.hexdigest()

    def _with(self, **changes) -> Dataset:
        out = copy.copy(self)
        for k, v in changes.items():
            setattr(out, "_x" if k == "x" else k, v)
        if out._x is not None:
            out._shape = [int(s) for s in out._x.shape[1:]]
        return out

    def _part(self, idx: torch.Tensor, name: str) -> Dataset:
        if self._x is not None:
            return self._with(x=self._x[idx], y=self.y[idx], name=name, validation=None)
        assert self.files is not None
        items = [self.files.items[int(i)] for i in idx]
        return self._with(files=replace(self.files, name=name, items=items), y=self.y[idx], name=name,
                          validation=None)

    def subset(self, idx) -> Dataset:
        """The samples at ``idx`` (indices, or a boolean mask over the set)."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        return self._part(idx.to(torch.int64).reshape(-1), self.name)

    def limit(self, n: int | None) -> Dataset:
        if n is None or n >= len(self):
            return self
        return self._part(torch.arange(n), f"{self.name}[:{n}]")

    def _permutation(self, seed: int) -> torch.Tensor:
        """The seeded order :meth:`split`, :meth:`sample` and :meth:`check_split` draw from."""
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A random validation part of the given fraction (at least one sample) and the rest."""
        perm = self._permutation(seed)
        k = max(1, int(round(fraction * len(self))))
        return self.subset(perm[:k]), self.subset(perm[k:])

    def sample(self, n: int, seed: int = 0) -> Dataset:
        """All of the set when it has at most ``n`` samples, else a seeded random ``n`` of them (the first n of
        the permutation :meth:`split` draws from, so a smaller sample is part of a larger one)."""
        if n >= len(self):
            return self
        return self._part(self._permutation(seed)[:n], f"{self.name}[random {n} of {len(self)}]")

    def with_validation(self, val: Dataset) -> Dataset:
        """This set with ``val`` kept apart for validation (``--val-data``); the sample shapes must match."""
        if val.sample_shape != self.sample_shape:
            raise UserError(f"{val.name}: validation samples have shape {'×'.join(map(str, val.sample_shape))} "
                            f"but the calibration data's ({self.name}) are {'×'.join(map(str, self.sample_shape))}")
        return self._with(validation=val)

    def validation_split(self, size: int, fraction: float | None = None, seed: int = 0) -> tuple[Dataset, Validation]:
        """The images that validate a conversion, and the record of how they were chosen.

        Drawn from :attr:`validation` when set (``--val-data``), else from this set. The count rule (the
        default): all of them when there are at most ``size``, else a seeded random ``size``. With
        ``fraction`` (``--val-fraction``, this set only): the random share :meth:`split` gives. Unlabeled
        images validate too: they are scored against the ANN's own outputs (:mod:`sfn_deploy.fidelity`).
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

    def check_split(self, size: int, val_size: int, fraction: float | None = None,
                    seed: int = 0) -> tuple[Dataset, Validation] | None:
        """Up to ``size`` images the λ search did not choose on (convert's check of its chosen point), and their
        record; None when there are none. The readings of the point a search chose as the best of many on the
        same images are optimistic (docs/concepts.md "Validation images and the drop"); these images are not.
        They follow :meth:`validation_split`'s images in the same seeded permutation of its pool; when validation
        took the whole pool (all of ``--val-data``), they are a seeded sample of this set (calibration images,
        which set θ but were not chosen on)."""
        taken = self.validation_split(val_size, fraction, seed)[1]
        pool = self if self.validation is None else self.validation
        source, start = taken.source, taken.samples
        if start >= len(pool):
            if self.validation is None:
                return None
            pool, source, start = self, "data", 0
        idx = pool._permutation(seed)[start:start + size]
        if not len(idx):
            return None
        part = pool._part(idx, f"{pool.name}[{len(idx)} not chosen on]")
        return part, Validation(source=source, data=pool.name, rule="not chosen on", samples=len(part),
                                available=len(pool), seed=seed)


def _check(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
    if x.ndim not in (2, 3, 4):
        raise UserError(f"{name}: 'x' must have shape N×C×H×W (images), N×C×L (signals) or N×F (features), got "
                        f"{tuple(x.shape)}")
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
    if (y < 0).any() and not (y == NO_LABEL).all():
        raise UserError(f"{name}: 'y' contains negative labels")
    return Dataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                   torch.from_numpy(y.astype(np.int64)), name)


def load_npz(path: str) -> Dataset:
    regular_file(path, ".npz data file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise UserError(f"{path}: missing key x (found: {', '.join(f.files) or 'none'})")
            x = f["x"]          # without y the samples are unlabeled (docs/data.md "Unlabeled data")
            y = f["y"] if "y" in f.files else np.full(x.shape[:1], NO_LABEL, dtype=np.int64)
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


def load_image_folder(path: str, workers: int = 0) -> Dataset:
    """A folder of class folders (or of images alone), read as [0, 1] pixels at their own size (all alike)."""
    return load_data(path, workers=workers)


def is_image_spec(spec: str | None) -> bool:
    """Whether ``--data`` names image files (a folder or a CSV/TSV list), which preprocessing applies to."""
    if not spec or spec.startswith(("sklearn:", "mnist:")):
        return False
    return os.path.isdir(spec) or spec.lower().endswith(LIST_EXT)


def data_paths(spec: str | None) -> list[str]:
    """The files or folders a ``--data`` spec reads."""
    if not spec or spec.startswith("sklearn:"):
        return []
    if spec.startswith("mnist:"):
        return [spec[len("mnist:"):].split(":")[0]]
    return [spec]


def check_not_read(output: str | None, spec: str | None, option: str = "-o") -> None:
    """Refuse an output that the image source ``spec`` would read (docs/security.md: no output is an input): an
    image file inside its folder, or a file its list names. Checked by name before any work starts."""
    if not output or not spec or not is_image_spec(spec):
        return
    real = os.path.realpath(output)
    if os.path.isdir(spec):
        if output.lower().endswith(IMAGE_EXT) and real.startswith(os.path.realpath(spec).rstrip(os.sep) + os.sep):
            raise UserError(f"{output}: {option} lies in the image folder {spec}, which the command reads; "
                            "writing it would change the input")
        return
    folder = os.path.realpath(os.path.dirname(os.path.abspath(spec)))
    if not os.path.isfile(spec) or not real.startswith(folder.rstrip(os.sep) + os.sep):
        return
    try:
        listing = list_table(spec)
    except UserError:
        return                          # a damaged list is refused, by name, when the data is read
    if any(os.path.realpath(p) == real for p, _ in listing.items):
        raise UserError(f"{output}: {option} is an image that {spec} lists; writing it would change the input")


def _tensor_spec(spec: str) -> tuple[Dataset, Preprocess | None]:
    """A tensor source and the recipe its tensors imply (mnist: its normalisation; digits: [0, 1] pixels)."""
    if spec == "sklearn:digits":
        return load_digits(), Preprocess(channels=1, origin="sklearn:digits (pixels scaled to [0, 1])")
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
        return load_mnist(parts[0], start, stop), Preprocess(channels=1, mean=(MNIST_MEAN,), std=(MNIST_STD,),
                                                             origin="mnist: (the loader's normalisation)")
    if spec.endswith(".npz") and not os.path.isdir(spec):
        return load_npz(spec), None
    if not os.path.exists(spec):
        raise UserError(f"{spec}: no such file or directory")
    raise UserError(f"{spec}: unknown data format (expected .npz, an image folder, a .csv/.tsv image list, "
                    "sklearn:digits or mnist:DIR)")


def _tensor_source(spec: str, options: dict, recorded: Preprocess | None, recorded_in: str) -> TensorSource:
    """A tensor source: the tensors as they are (already model inputs), with only the options given applied."""
    ds, implied = _tensor_spec(spec)
    if options and recorded is not None:
        plan(options, recorded=recorded, recorded_in=recorded_in)      # refuses what differs from the record
    if spec.startswith("mnist:") and ("mean" in options or "std" in options):
        raise UserError(f"{spec}: mnist: is already normalised (mean {MNIST_MEAN}, std {MNIST_STD}); --mean/--std "
                        "apply to images and .npz files")
    x, made = ds.x, implied
    if options:
        x = apply_to_tensors(ds.x, options, ds.name)
        base = implied or Preprocess(channels=int(ds.x.shape[1]), origin=f"{spec} (x taken as [0, 1] pixels)")
        made = replace(base, **options).check()
        made = replace(made, origin=f"{base.origin}; {', '.join(options)} from options")
    return TensorSource(ds.name, x=x, y=ds.y, preprocessing=made)


def _listing(spec: str, classes: list[str] | None, classes_from: str) -> Listing:
    if os.path.isdir(spec):
        return list_folder(spec, classes, classes_from)
    return list_table(spec, classes, classes_from)


def open_source(spec: str, options: dict | None = None, *, defaults: Preprocess | None = None,
                recorded: Preprocess | None = None, recorded_in: str = "the converted model",
                classes: list[str] | None = None, input_shape: list[int] | None = None,
                workers: int = 0, limit: int | None = None) -> Source:
    """The source a ``--data`` spec names, with its preprocessing chosen (:func:`sfn_deploy.preprocess.plan`).

    ``options``: preprocessing options given (parsed); ``defaults``: the model's own recipe (timm), used for
    image sources when nothing is ``recorded``; ``recorded``: the recipe of a converted model, applied to
    image sources and checked against ``options``; ``classes``: label names to map class folders and named
    labels onto (a converted model's); ``input_shape``: the model's, checked on the first image; ``workers``:
    DataLoader worker processes decoding images; ``limit``: the first this many samples only (images beyond it
    are never opened). Tensor sources (.npz, mnist:, sklearn:digits) are model
    inputs already: only explicit options are applied to them."""
    options = options or {}
    if not is_image_spec(spec):
        src = _tensor_source(spec, options, recorded, recorded_in)
        if limit is not None and limit < len(src):
            src = replace(src, name=f"{src.name}[:{limit}]", x=src.x[:limit], y=src.y[:limit])
        return src
    listing = _listing(spec, classes, f"recorded in {recorded_in}")
    if limit is not None and limit < len(listing.items):
        listing = replace(listing, name=f"{listing.name}[:{limit}]", items=listing.items[:limit])
    p = plan(options, defaults=defaults, recorded=recorded, recorded_in=recorded_in)
    if p.channels is None:
        p = p.with_channels(input_shape[0] if input_shape and input_shape[0] in (1, 3)
                            else probe_channels(listing.items[0][0]))
    return ImageSource(listing.name, preprocessing=p, classes=listing.classes, labeled=listing.labeled,
                       items=listing.items, workers=workers, expect=input_shape)


def as_dataset(src: Source) -> Dataset:
    """The Dataset of a source: tensors stay in memory, image files are streamed (read batch by batch)."""
    if isinstance(src, TensorSource):
        return Dataset(src.x, src.y, src.name, preprocessing=src.preprocessing, classes=src.classes)
    assert isinstance(src, ImageSource)
    y = torch.tensor([label for _, label in src.items], dtype=torch.int64)
    return Dataset(None, y, src.name, preprocessing=src.preprocessing, classes=src.classes, files=src)


def load_data(spec: str, options: dict | None = None, **how) -> Dataset:
    """Open a data set from a path or a built-in name (see module docstring); ``options`` and ``how`` as
    :func:`open_source`. Image files are streamed: nothing is decoded here but, when the model's input shape
    is not given, the first image (its shape)."""
    return as_dataset(open_source(spec, options, **how))
