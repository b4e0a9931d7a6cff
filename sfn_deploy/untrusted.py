"""Reading files a user hands us: nothing in them may run (docs/security.md).

A model file is untrusted input. ``torch.export.load`` would unpickle entries of a ``.pt2``
archive with ``weights_only=False``, evaluate its symbolic shape expressions with sympy's
``eval``, load AOTInductor shared libraries and keep guard code for later ``exec``. So a ``.pt2``
is read once into memory, checked entry by entry, rebuilt from exactly the checked entries and
only then deserialised, with PyTorch's own switch ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` forcing
weights-only unpickling for every ``torch.load`` inside. Anything that needs more is refused,
naming the entry.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import stat
import warnings
import zipfile

import torch

from .errors import UserError

ZIP_MAGIC = b"PK\x03\x04"
MAX_EXPANSION = 1 << 30     # a zip's members may expand to max(1 GiB, 20 × the archive) (zip bombs)
MAX_EXPR_CHARS = 10_000
_TARGET = re.compile(
    r"^(torch\.ops\.(aten|prims|higher_order)\.\w+(\.\w+)?"
    r"|torch\.sym_[a-z_]+|torch\._check[a-z_]*|math\.[a-z][a-z0-9_]*)$")
_OPERATOR_TARGETS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs",
                     "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
                     "rshift"}
_FILE_OPS = {"from_file"}     # aten ops that open files


def file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def regular_file(path: str, what: str = "file") -> str:
    """Refuse a missing path or one that is not a regular file (a folder, FIFO, device: /dev/zero would hang)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: is {file_kind(st.st_mode)}, not a regular file; expected a {what}")
    return path


def read_bytes(path: str, what: str = "file") -> bytes:
    """The whole file, opened non-blocking and checked again once open (a path swapped for a FIFO after the
    check cannot make the read wait forever)."""
    regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise UserError(f"{path}: is {file_kind(mode)}, not a regular file; expected a {what}")
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def zip_overexpands(infos: list, size: int) -> int | None:
    """The bytes a zip archive of ``size`` bytes expands to, when that is beyond max(MAX_EXPANSION, 20 × size)
    (a zip bomb); None when it is not."""
    total = sum(i.file_size for i in infos)
    return total if total > max(MAX_EXPANSION, 20 * size) else None


def reason(e: BaseException) -> str:
    """A library's error as one line, without advice to disable safety (torch suggests weights_only=False)."""
    text = str(e).strip()
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        return ("holds pickled objects other than tensors and plain data"
                + (f" ({m.group(1)})" if m else "") + ": loading them could run code from the file")
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"\s*Please check the warnings above[^.]*\.?", "", line).strip()
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


@contextlib.contextmanager
def weights_only():
    """Force weights-only unpickling for every ``torch.load`` inside, whatever its caller passes."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torch_load(path: str, what: str = "file"):
    """``torch.load`` of an untrusted ``torch.save`` archive: tensors and plain containers only; PyTorch's own
    text (which suggests ``weights_only=False``) never reaches the user."""
    return torch_loads(read_bytes(path, what), path, what)


def torch_loads(data: bytes, path: str, what: str = "file"):
    """:func:`torch_load` of the bytes already read from ``path``."""
    if not data:
        raise UserError(f"{path}: empty file, not a {what}")
    if not data.startswith(ZIP_MAGIC):
        raise UserError(f"{path}: not a {what} (not a torch.save archive)")
    try:
        with weights_only():
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        why = reason(e)
        if why.startswith("holds pickled"):
            raise UserError(f"{path}: refused: the file {why}") from None
        raise UserError(f"{path}: damaged or not a {what} (the torch archive cannot be read: {why})") from None


# ---- torch.export archives -------------------------------------------------------------------

def load_exported_program(path: str):
    """(ExportedProgram, sha256 of the file) from an untrusted ``.pt2``, or a UserError naming the entry."""
    data = read_bytes(path, "torch.export program (.pt2)")
    if not data.startswith(ZIP_MAGIC):
        raise UserError(f"{path}: not a torch.export program (.pt2 archives are zip files)")
    digest = hashlib.sha256(data).hexdigest()
    archive = _checked_archive(path, data)
    try:
        with weights_only(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            ep = torch.export.load(io.BytesIO(archive))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable torch.export program ({reason(e)})") from e
    return ep, digest


def _checked_archive(path: str, data: bytes) -> bytes:
    try:
        zin = zipfile.ZipFile(io.BytesIO(data))
        infos = zin.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path}: damaged .pt2 archive ({reason(e)})") from e
    total = zip_overexpands(infos, len(data))
    if total:
        raise UserError(f"{path}: damaged .pt2 archive (entries expand to {total:,} bytes from {len(data):,})")
    roots = {i.filename.split("/", 1)[0] for i in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos):
        raise UserError(f"{path}: not a torch.export program (entries outside one archive folder)")
    root = roots.pop()
    entries: dict[str, bytes] = {}
    try:
        for i in infos:
            rel = i.filename[len(root) + 1:]
            if rel in entries:
                raise UserError(f"{path}: damaged .pt2 archive (entry {rel} appears twice)")
            entries[rel] = zin.read(i)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: damaged .pt2 archive ({reason(e)})") from e
    for rel in entries:
        if rel.startswith(("data/aotinductor/", "data/mtia/")) or rel.endswith((".so", ".dll", ".dylib")):
            raise UserError(f"{path}: refused: entry {rel} is compiled code (AOTInductor); sfn-deploy reads "
                            "torch.export programs only")
    models = [r for r in entries if r.startswith("models/") and r.endswith(".json")]
    if entries.get("archive_format", b"").strip() != b"pt2" or not models:
        raise UserError(f"{path}: not a torch.export program (no archive_format/models entries); save it with "
                        "torch.export.save")
    for rel in models:
        name = rel[len("models/"):-len(".json")]
        entries[rel] = _checked_program_json(path, rel, entries[rel])
        for pickled in _pickled_entries(path, entries, name):
            _check_pickle(path, pickled, entries[pickled])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for rel, blob in entries.items():
            zout.writestr(f"{root}/{rel}", blob)
    return out.getvalue()


def _json_entry(path: str, rel: str, blob: bytes):
    try:
        return json.loads(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged .pt2 archive (entry {rel}: {reason(e)})") from e


def _pickled_entries(path: str, entries: dict, model: str) -> list[str]:
    """Every entry torch would unpickle for one model: sample inputs, legacy and pickled weights/constants."""
    out = [r for r in (f"data/sample_inputs/{model}.pt", f"data/weights/{model}.pt", f"data/constants/{model}.pt")
           if r in entries]
    for folder, config in (("data/weights/", f"data/weights/{model}_weights_config.json"),
                           ("data/constants/", f"data/constants/{model}_constants_config.json")):
        if config not in entries:
            continue
        cfg = _json_entry(path, config, entries[config])
        items = cfg.get("config", {}) if isinstance(cfg, dict) else None
        if not isinstance(items, dict):
            raise UserError(f"{path}: damaged .pt2 archive (entry {config} is not a payload config)")
        for fqn, meta in items.items():
            name = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(name, str) or os.path.normpath(name) != name or name.startswith(("/", "..")):
                raise UserError(f"{path}: damaged .pt2 archive (entry {config}: bad path for {fqn!r})")
            if folder + name not in entries:
                raise UserError(f"{path}: damaged .pt2 archive ({config} names entry {folder}{name}, which is "
                                "missing)")
            if name.startswith("custom_obj"):
                raise UserError(f"{path}: refused: constant {fqn!r} is a TorchScript object (entry {folder}{name}); "
                                "sfn-deploy reads tensors only")
            if meta.get("use_pickle"):
                out.append(folder + name)
    return out


def _check_pickle(path: str, rel: str, blob: bytes) -> None:
    try:
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: refused: entry {rel} {reason(e)}") from e


def _checked_program_json(path: str, rel: str, blob: bytes) -> bytes:
    """The program's JSON with every operator target and shape expression checked; guard code dropped
    (it is only compiled by ``ExportedProgram.module()``, which sfn-deploy never calls)."""
    prog = _json_entry(path, rel, blob)
    if not isinstance(prog, dict):
        raise UserError(f"{path}: damaged .pt2 archive (entry {rel} is not a program)")

    def walk(o):
        if isinstance(o, dict):
            if isinstance(o.get("target"), str) and "inputs" in o:
                _check_target(path, rel, o["target"])
            for k, v in o.items():
                if k == "expr_str":
                    _check_expr(path, rel, v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(prog)
    if prog.get("guards_code"):
        prog["guards_code"] = []
    return json.dumps(prog).encode()


def _check_target(path: str, rel: str, target: str) -> None:
    ok = bool(_TARGET.match(target)) and "__" not in target and \
        not any(part in _FILE_OPS for part in target.split("."))
    if target.startswith("_operator."):
        ok = target[len("_operator."):] in _OPERATOR_TARGETS
    if not ok:
        raise UserError(f"{path}: refused: entry {rel} calls {target!r}, which is not a PyTorch operator")


def _sympy_names() -> set[str]:
    import sympy
    from torch.utils._sympy import functions as tf
    names = {n for n in dir(sympy) if isinstance(getattr(sympy, n), type)
             and issubclass(getattr(sympy, n), sympy.Basic)}
    return names | {n for n in dir(tf) if isinstance(getattr(tf, n), type) and issubclass(getattr(tf, n), sympy.Basic)}


_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Constant, ast.Name, ast.Load,
               ast.Call, ast.keyword, ast.operator, ast.unaryop, ast.boolop, ast.cmpop)


def _check_expr(path: str, rel: str, text) -> None:
    """A shape expression (sympy evaluates it with eval): names, numbers, arithmetic and sympy classes only."""
    bad = f"{path}: refused: entry {rel} holds a shape expression that is not plain arithmetic"
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise UserError(bad)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise UserError(f"{bad}: {text[:80]!r}") from None
    allowed = _sympy_names()
    for node in ast.walk(tree):
        ok = isinstance(node, _EXPR_NODES)
        if isinstance(node, ast.Name):
            ok = not node.id.startswith("_")
        elif isinstance(node, ast.Constant):
            ok = isinstance(node.value, (int, float, bool, str)) or node.value is None
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in allowed
        if not ok:
            raise UserError(f"{bad}: {text[:80]!r}")
