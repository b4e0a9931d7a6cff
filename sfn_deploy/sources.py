"""Where samples come from: a :class:`Source` yields batches ``(x, y)``; :func:`sfn_deploy.data.load_data`
wraps it in a :class:`~sfn_deploy.data.Dataset` (docs/data.md).

Sources: :class:`TensorSource` (tensors already in memory: ``.npz``, ``mnist:``, ``sklearn:digits``) and
:class:`ImageSource` (image files listed by :func:`list_folder` or :func:`list_table`, decoded by PIL and
preprocessed in ``torch.utils.data.DataLoader`` worker processes). Every file is untrusted
(docs/security.md): only regular files are opened (non-blocking), PIL may use only the decoders of
:data:`FORMATS`, images over :data:`MAX_PIXELS` pixels are refused before they are decoded, and a file that
does not decode is refused by name (exit 2) rather than skipped. Unlabeled sources carry the label
:data:`NO_LABEL` (-1).

Streaming: a source holds a listing and a recipe, not pixels; :meth:`Source.batches` decodes one batch
at a time, and every consumer (calibration, evaluation, counting, reports) reads it that way (a
:class:`~sfn_deploy.data.Dataset` with ``files``). The per-batch checks — equal sizes, the model's input
shape, decode errors — run as the batches arrive.
"""
from __future__ import annotations

import csv
import io
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .preprocess import Preprocess, image_transform
from .untrusted import file_kind, read_bytes

NO_LABEL = -1
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")      # PIL decoders allowed (no EPS: it runs Ghostscript)
MAX_PIXELS = 89_478_485             # PIL's decompression-bomb limit, enforced here whatever PIL's global says
_GREY = ("1", "L", "LA", "I", "F")
DEFAULT_WORKERS = 2


def _shape(t) -> str:
    return "×".join(map(str, t))


@dataclass
class Listing:
    """The files of an image source: ``items`` (path, label or NO_LABEL) in a fixed order."""
    name: str
    items: list[tuple[str, int]]
    classes: list[str] | None = None          # label i is classes[i] (None: unlabeled, or integer labels)

    @property
    def labeled(self) -> bool:
        return bool(self.items) and self.items[0][1] != NO_LABEL


def _visible(names) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXT)


def _class_index(name: str, classes: list[str] | None, where: str, known: str) -> int:
    if classes is None:
        raise AssertionError("class names needed")
    try:
        return classes.index(name)
    except ValueError:
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise UserError(f"{where}: class {name!r} is not one of the {len(classes)} classes {known} "
                        f"({shown})") from None


def list_folder(path: str, classes: list[str] | None = None, known: str = "recorded") -> Listing:
    """Class folders (``path/CLASS/**/*.jpg``, ImageNet layout: label = index of the class name among
    ``classes`` when given, else among the sorted folder names) or, when ``path`` has no sub-folders,
    an unlabeled folder of images. Names starting with a dot are skipped; so are files whose extension
    is not an image's (:data:`IMAGE_EXT`). Images beside class folders are refused (which label?)."""
    try:
        entries = _visible(os.listdir(path))
    except OSError as e:
        raise UserError(f"{path}: cannot read the folder ({e.strerror})") from None
    subdirs = [n for n in entries if os.path.isdir(os.path.join(path, n))]
    loose = [n for n in entries if n not in subdirs and _is_image(n)]
    if subdirs and loose:
        raise UserError(f"{os.path.join(path, loose[0])}: an image beside the class folders ({', '.join(subdirs[:3])}"
                        f"{', ...' if len(subdirs) > 3 else ''}); move it into its class folder, or list the "
                        "images in a CSV file")
    if not subdirs:
        items = [(os.path.join(path, n), NO_LABEL) for n in loose]
        if not items:
            raise UserError(f"{path}: no images found (expected class folders, or image files: "
                            f"{', '.join(IMAGE_EXT)})")
        return Listing(path, items)
    names = classes if classes is not None else subdirs
    items = []
    for cls in subdirs:
        label = _class_index(cls, names, os.path.join(path, cls), known)
        for root, dirs, files in os.walk(os.path.join(path, cls)):
            dirs[:] = _visible(dirs)
            items += [(os.path.join(root, f), label) for f in _visible(files) if _is_image(f)]
    if not items:
        raise UserError(f"{path}: no images found in the class folders")
    return Listing(path, items, list(names))


def _inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, root]) == root


def list_table(path: str, classes: list[str] | None = None, known: str = "recorded") -> Listing:
    """A CSV (``.csv``) or TSV (``.tsv``) list of ``path,label`` rows, or of paths alone (unlabeled).
    Paths are relative to the list's folder and must stay inside it (absolute paths, ``..`` and symbolic
    links that lead out are refused: a list is untrusted). Labels are class indices when every label is
    a whole number, else class names (indices: their place in ``classes`` when given, else in the sorted
    names). A first row ``path,label`` (or ``path``) is a header."""
    blob = read_bytes(path, "image list (CSV/TSV)")
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a CSV/TSV text file (not UTF-8)") from None
    folder = os.path.dirname(os.path.abspath(path))
    root = os.path.realpath(folder)
    rows: list[tuple[int, str, str | None]] = []
    try:
        reader = list(csv.reader(io.StringIO(text), delimiter="\t" if path.lower().endswith(".tsv") else ","))
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV/TSV list ({e})") from None
    for lineno, row in enumerate(reader, 1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if not rows and [c.lower() for c in cells] in (["path", "label"], ["path"]):
            continue
        if len(cells) not in (1, 2) or not cells[0]:
            raise UserError(f"{path}: line {lineno}: expected 'path,label' or 'path', got {len(cells)} field(s)")
        rel = cells[0]
        if os.path.isabs(rel) or not _inside(root, os.path.join(folder, rel)):
            raise UserError(f"{path}: line {lineno}: {rel!r} leads outside the list's folder {folder} (paths are "
                            "relative to the list and must stay inside its folder)")
        rows.append((lineno, os.path.join(folder, rel), cells[1] if len(cells) == 2 else None))
    if not rows:
        raise UserError(f"{path}: the list names no images")
    with_label = [r for r in rows if r[2] is not None]
    if with_label and len(with_label) != len(rows):
        odd = next(r for r in rows if (r[2] is None) == (rows[0][2] is not None))
        raise UserError(f"{path}: line {odd[0]}: {'no label' if odd[2] is None else 'a label'} where line "
                        f"{rows[0][0]} has {'one' if rows[0][2] is not None else 'none'} (label every image or none)")
    if not with_label:
        return Listing(path, [(p, NO_LABEL) for _, p, _ in rows])
    labels = [lab for _, _, lab in rows if lab is not None]
    if all(lab.isdigit() for lab in labels):
        return Listing(path, [(p, int(lab)) for _, p, lab in rows if lab is not None], classes)
    names = classes if classes is not None else sorted(set(labels))
    return Listing(path, [(p, _class_index(lab, names, f"{path}: line {n}", known))
                          for n, p, lab in rows if lab is not None], list(names))


# ---------------------------------------------------------------- decoding

def _channels_of(mode: str) -> int:
    return 1 if mode in _GREY or mode.startswith("I;16") else 3


def open_image(path: str, channels: int | None):
    """The image at ``path`` as a PIL image in mode L (channels 1) or RGB (3); channels None: the image's
    own (greyscale modes: 1, anything else: 3). Refused by name (UserError): anything but a regular file,
    formats outside :data:`FORMATS`, more than :data:`MAX_PIXELS` pixels, a file that does not decode."""
    from PIL import Image, UnidentifiedImageError
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: is {file_kind(mode)}, not a regular file; expected an image file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(f, formats=FORMATS) as im:
                    w, h = im.size
                    if w * h > MAX_PIXELS:
                        raise UserError(f"{path}: {w}×{h} pixels is over the decompression-bomb limit "
                                        f"({MAX_PIXELS:,} pixels); refusing to decode it")
                    want = channels or _channels_of(im.mode)
                    return im.convert("L" if want == 1 else "RGB")
            except UserError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise UserError(f"{path}: over PIL's decompression-bomb limit; refusing to decode it") from None
            except UnidentifiedImageError:
                raise UserError(f"{path}: not a readable image (not {', '.join(FORMATS[:-1])} or {FORMATS[-1]})"
                                ) from None
            except Exception as e:
                text = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"{path}: not a readable image ({text})") from None


def probe_channels(path: str) -> int:
    """1 for a greyscale image, 3 otherwise: the channels of a source whose recipe does not say."""
    return 1 if open_image(path, None).mode == "L" else 3


class ImageFiles(torch.utils.data.Dataset):
    """The map-style dataset a DataLoader reads: item i is (C×H×W tensor or None, label, i, error or None).
    Errors travel as text, so a worker's refusal reaches the user as the same one line."""

    def __init__(self, items: list[tuple[str, int]], preprocess: Preprocess):
        self.items, self.preprocess = items, preprocess
        self.transform = image_transform(preprocess)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            return self.transform(open_image(path, self.preprocess.channels)), label, i, None
        except UserError as e:
            return None, label, i, str(e)


def _keep(batch):
    return batch


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------- sources

@dataclass
class Source:
    """Samples and what they are: ``preprocessing`` (the recipe that made them from pixels, recorded by
    ``convert``; None when unknown), ``classes`` (label names, recorded too) and whether they carry labels."""
    name: str
    preprocessing: Preprocess | None = field(default=None, kw_only=True)
    classes: list[str] | None = field(default=None, kw_only=True)
    labeled: bool = field(default=True, kw_only=True)

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32 B×C×H×W, y int64 B) in a fixed order, one batch in memory at a time."""
        raise NotImplementedError


@dataclass
class TensorSource(Source):
    x: torch.Tensor = field(default_factory=lambda: torch.zeros(0), kw_only=True)
    y: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64), kw_only=True)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int = 256):
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


@dataclass
class ImageSource(Source):
    """Image files decoded and preprocessed by ``workers`` DataLoader processes (0: in this process).
    ``expect``: the model's input shape (C, H, W), checked on the first image so a wrong recipe fails
    before the whole folder is read."""
    items: list[tuple[str, int]] = field(default_factory=list, kw_only=True)
    workers: int = field(default=0, kw_only=True)
    expect: list[int] | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size: int = 256):
        assert self.preprocessing is not None and self.preprocessing.channels is not None
        loader = torch.utils.data.DataLoader(
            ImageFiles(self.items, self.preprocessing), batch_size=batch_size, shuffle=False,
            num_workers=self.workers, collate_fn=_keep, worker_init_fn=_one_thread if self.workers else None)
        first: tuple[str, list[int]] | None = None
        for batch in loader:
            xs, ys = [], []
            for x, label, i, error in batch:
                if error is not None:
                    raise UserError(error)
                first = self._check_shape(first, self.items[i][0], list(x.shape))
                xs.append(x)
                ys.append(label)
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    def _check_shape(self, first, path: str, shape: list[int]):
        if first is None:
            if self.expect is not None and shape != list(self.expect):
                raise UserError(f"{path}: {_shape(shape)} after preprocessing ({self._recipe()}), but the model "
                                f"takes {_shape(self.expect)} inputs; give --resize/--crop for its size")
            return path, shape
        if shape != first[1]:
            raise UserError(f"{path}: {_shape(shape)} after preprocessing, but {first[0]} is {_shape(first[1])}: "
                            f"images of different sizes need --resize and/or --crop to one size ({self._recipe()})")
        return first

    def _recipe(self) -> str:
        return self.preprocessing.describe() if self.preprocessing else "none"
