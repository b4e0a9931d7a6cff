"""The converted-model file (SPEC §6): one ``torch.save`` archive of plain data and tensors.

It loads with ``torch.load(weights_only=True)``: no pickled code runs. Writes go to a
temporary name in the same folder and are renamed when complete, so an interrupted
write never leaves a half-written model.

Integrity (docs/security.md): ``save`` stores ``content_sha256``, a SHA-256 over a canonical
serialisation of everything else in the file (:func:`content_hash`), and ``load`` recomputes it,
so damaged bytes anywhere in the content are refused instead of silently changing the network.
Files written before the hash existed carry none; they are accepted, and like every file the graph
is then validated (:func:`sfn_deploy.ir.validate_graph`: structure, references, attrs, finite
params, and every node's shape by one batch-1 shape run). The hash detects damage,
not tampering: anyone who can edit the file can recompute it.
"""
from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UserError
from .ir import FORMAT, FORMAT_VERSION, Graph, GraphError, check_graph_dict, validate_graph
from .preprocess import Preprocess
from .untrusted import file_kind, torch_load
from .version import __version__

HASH_KEY = "content_sha256"          # the file's own field: hex SHA-256 of the rest (content_hash)
_HASH_DOMAIN = b"sfn-deploy/content-hash/1\n"
_MAX_DEPTH = 64


@dataclass
class ConvertedModel:
    graph: Graph
    input_shape: list[int]                       # one sample, without the batch axis
    config: dict = field(default_factory=dict)   # the effective ConvertConfig
    source: dict = field(default_factory=dict)   # what it was converted from
    metrics: dict = field(default_factory=dict)  # validation figures at conversion time
    search: dict = field(default_factory=dict)   # λ search: study, Pareto front, choice
    # how images became the calibration inputs (docs/data.md), reused by every later command; None: not known
    preprocessing: Preprocess | None = None
    classes: list[str] | None = None             # output i is class classes[i] (from class folders or a list)
    # the Evaluation on the validation images that convert(validate=True) measured; never saved (metrics keep
    # its figures)
    validation: Any = field(default=None, repr=False, compare=False)

    @property
    def sites(self):
        return self.graph.sites

    def to_dict(self) -> dict:
        # a plain SFN network stays version 1, so older sfn-deploy releases still read it
        version = 1 if self.graph.method == "sfn" and not self.graph.stateful else FORMAT_VERSION
        d = {"format": FORMAT, "format_version": version, "sfn_deploy_version": __version__,
             "graph": self.graph.to_dict(), "input_shape": list(self.input_shape), "config": self.config,
             "source": self.source, "metrics": self.metrics, "search": self.search}
        if self.preprocessing is not None:      # (older releases ignore these keys)
            d["preprocessing"] = self.preprocessing.to_dict()
        if self.classes is not None:
            d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConvertedModel:
        pre = d.get("preprocessing")
        return cls(Graph.from_dict(d["graph"]), d["input_shape"], d.get("config", {}), d.get("source", {}),
                   d.get("metrics", {}), d.get("search", {}),
                   None if pre is None else Preprocess.from_dict(pre), d.get("classes"))


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


class WriteError(UserError, OSError):
    """An output that cannot be written (permissions, a full disk, ...): a UserError for the CLI (one line,
    exit 2) that is still an OSError for callers that catch those."""


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path; remove the temporary file on failure.

    Refused before anything is written: an existing ``path`` that is not a regular file (a directory, a
    device node such as /dev/full, a FIFO, a socket: renaming onto it would replace the node itself), and a
    missing folder. An OSError while writing (read-only folder, full disk) becomes a :class:`WriteError`
    "PATH: cannot write (reason)".
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None                           # (a dangling symbolic link is replaced like a missing file)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({_reason(e)})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: exists and is {file_kind(st.st_mode)}, not a regular file; "
                        f"refusing to replace it (give a file name)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({_reason(e)})") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp makes 0600; give the file a normal mode
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, UserError):
            raise WriteError(f"{path}: cannot write ({_reason(e)})") from e
        raise


# ---------------------------------------------------------------- content hash

def content_hash(d: dict) -> str:
    """Hex SHA-256 of a model dict without its ``content_sha256`` field, over a canonical serialisation:
    every value is written with a type tag (None, bool, int, float as float.hex, str as UTF-8 with its
    length, lists and tuples alike, dicts with their entries sorted by the serialised key, tensors as dtype,
    shape and the bytes of their contiguous values), so the hash depends on the content only, not on how
    torch laid out storages or pickled the file. Raises TypeError for any other kind of value and
    ValueError for cyclic or absurdly deep nesting."""
    h = hashlib.sha256(_HASH_DOMAIN)
    buf = bytearray()
    _feed(h, buf, {k: v for k, v in d.items() if k != HASH_KEY}, [], set())
    h.update(buf)
    return h.hexdigest()


def _scalar(v) -> bytes | None:
    t = type(v)                         # exact types first: the bulk of the plain values
    if t is float:
        return b"f" + v.hex().encode() + b";"
    if t is int:
        return b"i%d;" % v
    if t is str:
        b = v.encode("utf-8", "surrogatepass")
        return b"s%d:" % len(b) + b
    if v is None:
        return b"N"
    if isinstance(v, bool):
        return b"T" if v else b"F"
    if isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        return b"s%d:" % len(b) + b
    if isinstance(v, numbers.Integral):
        return b"i%d;" % int(v)
    if isinstance(v, numbers.Real):
        return b"f" + float(v).hex().encode() + b";"
    if isinstance(v, numbers.Complex):
        c = complex(v)
        return b"c" + c.real.hex().encode() + b"," + c.imag.hex().encode() + b";"
    if isinstance(v, bytes):
        return b"b%d:" % len(v) + v
    if isinstance(v, torch.dtype):
        return b"y" + str(v).encode() + b";"
    if isinstance(v, torch.device):
        return b"v" + str(v).encode() + b";"
    return None


def _where(trail: list) -> str:
    return "".join(f"[{k!r}]" for k in trail) or "the top level"


def _feed(h, buf: bytearray, v, trail: list, active: set) -> None:
    s = _scalar(v)
    if s is not None:
        buf += s
        return
    if isinstance(v, torch.Tensor):
        if v.layout != torch.strided or v.is_quantized or v.device.type == "meta":
            raise TypeError(f"a {v.layout} tensor at {_where(trail)}")
        t = v.detach().cpu().resolve_conj().resolve_neg().contiguous()
        buf += b"t" + str(t.dtype).encode() + b"(" + ",".join(map(str, t.shape)).encode() + b")"
        buf += b"%d:" % (t.numel() * t.element_size())
        h.update(buf)
        buf.clear()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return
    if not isinstance(v, (list, tuple, dict)):
        raise TypeError(f"a {type(v).__name__} value at {_where(trail)}")
    if id(v) in active:
        raise ValueError(f"a cyclic reference at {_where(trail)}")
    if len(trail) >= _MAX_DEPTH:
        raise ValueError(f"nesting deeper than {_MAX_DEPTH} levels at {_where(trail)}")
    active.add(id(v))
    if isinstance(v, dict):
        keys = []
        for k in v:
            ks = _scalar(k)
            if ks is None:
                raise TypeError(f"a {type(k).__name__} key at {_where(trail)}")
            keys.append((ks, k))
        keys.sort(key=lambda e: e[0])
        buf += b"d%d{" % len(keys)
        for ks, k in keys:
            buf += ks
            trail.append(k)
            _feed(h, buf, v[k], trail, active)
            trail.pop()
        buf += b"}"
    else:
        buf += b"l%d[" % len(v)
        for i, item in enumerate(v):
            trail.append(i)
            _feed(h, buf, item, trail, active)
            trail.pop()
        buf += b"]"
    active.discard(id(v))


# ---------------------------------------------------------------- save / load

def save(model: ConvertedModel, path: str) -> None:
    d = model.to_dict()
    d[HASH_KEY] = content_hash(d)
    atomic_write(path, lambda tmp: torch.save(d, tmp))


def _read(path: str):
    return torch_load(path, "converted sfn-deploy model (run 'sfn-deploy convert')")


def _check_top(d: dict) -> None:
    shape = d.get("input_shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                              for s in shape):
        raise GraphError("'input_shape' must be a list of positive integers")
    for key in ("config", "source", "metrics", "search"):
        if key in d and not isinstance(d[key], dict):
            raise GraphError(f"{key!r} is a {type(d[key]).__name__}, not a dict")
    if d.get("preprocessing") is not None:
        try:
            Preprocess.from_dict(d["preprocessing"])
        except ValueError as e:
            raise GraphError(f"'preprocessing' {e}") from None
    classes = d.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
                                or len(set(classes)) != len(classes)):
        raise GraphError("'classes' must be a list of distinct names")
    check_graph_dict(d.get("graph"))


def load(path: str) -> ConvertedModel:
    """Read a converted model; refuse (UserError, one line naming the file) anything that is not one:
    non-regular files, non-archives, archives with pickled code, a content hash that does not match, and
    graphs that fail :func:`sfn_deploy.ir.validate_graph`."""
    d = _read(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path}: not a converted sfn-deploy model (run 'sfn-deploy convert' first)")
    v = d.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"{path}: damaged converted model (format_version {v!r})")
    if v > FORMAT_VERSION:
        raise UserError(f"{path}: model format version {v} is newer than this sfn-deploy supports "
                        f"({FORMAT_VERSION}); upgrade sfn-deploy")
    if HASH_KEY in d:                 # files written before the hash existed have none: validated below
        stored = d[HASH_KEY]
        try:
            actual = content_hash(d)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: damaged converted model (it holds {e})") from None
        if not isinstance(stored, str) or stored != actual:
            raise UserError(f"{path}: damaged converted model (content hash does not match)")
    try:
        _check_top(d)
        model = ConvertedModel.from_dict(d)
        validate_graph(model.graph)
        want = list(model.graph.input.shape[1:])
        if want != list(model.input_shape):
            raise GraphError(f"'input_shape' {model.input_shape} disagrees with the input node's shape {want}")
    except (GraphError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: invalid converted model ({e})") from None
    return model
