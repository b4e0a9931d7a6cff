"""Operators that move, select or broadcast data without arithmetic; each keeps track of the batch axis."""
from __future__ import annotations

import operator

import torch

from .builder import Unsupported, arg, meta_shape, prod, rule, sym_entries

aten = torch.ops.aten


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
      aten.reshape_as.default, aten.view_as.default)
def reshape(b, n):
    x, shape = b.ir(n.args[0]), meta_shape(n)
    sh, bdim, outer = batch_reshape(x, shape, sym_entries(n), b.batch, b.outer.get(x.name, 1))
    return b.emit(n, "reshape", [x], {"shape": sh}, {}, shape, bdim, outer=outer)


@rule(aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
def to_dtype(b, n):
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        raise Unsupported(f"conversion to {getattr(val, 'dtype', '?')}: the converted network computes in float32")
    return b.ir(n.args[0])


PAD_MODES = ("constant", "reflect", "replicate", "circular")


@rule(aten.constant_pad_nd.default, aten.pad.default)
def pad(b, n):
    x = b.ir(n.args[0])
    widths = [int(v) for v in n.args[1]]
    mode = arg(n, 2, "mode", "constant") if n.target == aten.pad.default else "constant"
    value = arg(n, 3, "value", None) if n.target == aten.pad.default else arg(n, 2, "value", 0)
    if mode not in PAD_MODES:
        raise Unsupported(f"{mode} padding (constant, reflect, replicate and circular are supported)")
    r = len(x.shape)
    padded = [r - 1 - i // 2 for i in range(0, len(widths), 2) if widths[i] or widths[i + 1]]
    if x.bdim in padded:
        raise Unsupported("padding the batch axis")
    if any(v < 0 for v in widths):
        raise Unsupported("negative padding (cropping)")
    attrs = {"pad": widths, "value": float(value or 0.0)} if mode == "constant" else {"pad": widths, "mode": mode}
    return b.emit(n, "pad", [x], attrs, {}, meta_shape(n))


@rule(aten.roll.default)
def roll(b, n):
    x = b.ir(n.args[0])
    shifts = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
    dims = arg(n, 2, "dims", [])
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        raise Unsupported("roll over the flattened tensor")
    dims = [d % len(x.shape) for d in dims]
    if x.bdim in dims:
        raise Unsupported("roll along the batch axis")
    return b.emit(n, "roll", [x], {"shifts": [int(v) for v in shifts], "dims": dims}, {}, meta_shape(n))


def _split(b, n, x, sizes: list[int], d: int):
    """A tuple of slices along axis d (split, chunk): one IR slice per output, read by getitem."""
    parts, start = [], 0
    for i, size in enumerate(sizes):
        shape = list(x.shape)
        shape[d] = size
        parts.append(slice_node(b, n, x, d, start, start + size, 1, shape, name=f"{n.name}_{i}"))
        start += size
    b.tuples[n.name] = parts


@rule(aten.split_with_sizes.default, aten.split.Tensor, aten.unsafe_split.Tensor, aten.chunk.default,
      aten.split_with_sizes_copy.default, aten.split.sizes)
def split(b, n):
    x = b.ir(n.args[0])
    d = int(arg(n, 2, "dim", 0)) % len(x.shape)
    total = x.shape[d]
    if n.target == aten.chunk.default:
        step = -(-total // int(n.args[1]))
        sizes = [min(step, total - s) for s in range(0, total, step)]
    elif isinstance(n.args[1], (list, tuple)):
        sizes = [int(v) for v in n.args[1]]
    else:
        step = int(n.args[1])
        sizes = [min(step, total - s) for s in range(0, total, step)]
    _split(b, n, x, sizes, d)
    return None


@rule(aten.stack.default)
def stack(b, n):
    xs = [b.ir(a) for a in n.args[0]]
    shape = meta_shape(n)
    d = int(arg(n, 1, "dim", 0)) % len(shape)
    ups = []
    for i, x in enumerate(xs):
        bdim = None if x.bdim is None else x.bdim + (d <= x.bdim)
        up_shape = list(x.shape)
        up_shape.insert(d, 1)
        ups.append(b.emit(n, "unsqueeze", [x], {"dim": d}, {}, up_shape, bdim, name=f"{n.name}_{i}"))
    bd = [u.bdim for u in ups if u.bdim is not None]
    if bd and bd[0] == d:
        raise Unsupported("stacking along the batch axis")
    return b.emit(n, "cat", ups, {"dim": d}, {}, shape, bd[0] if bd else None)


@rule(aten.flatten.using_ints)
def flatten(b, n):
    x = b.ir(n.args[0])
    r = len(x.shape)
    s, e = (n.args[1] if len(n.args) > 1 else 0) % r, (n.args[2] if len(n.args) > 2 else -1) % r
    if x.bdim is not None and s <= x.bdim <= e and s != e:
        shape = meta_shape(n)           # the batch axis takes the axes around it in: "B*k"
        sh: list = list(shape)
        sh[s] = f"B*{shape[s] // b.batch}"
        outer = prod(x.shape[s:x.bdim]) * b.outer.get(x.name, 1)
        return b.emit(n, "reshape", [x], {"shape": sh}, {}, shape, s, outer=outer)
    bdim = None if x.bdim is None else (x.bdim if x.bdim < s else x.bdim - (e - s) if x.bdim > e else s)
    return b.emit(n, "flatten", [x], {"start": s, "end": e}, {}, meta_shape(n), bdim)


@rule(aten.permute.default)
def permute(b, n):
    x = b.ir(n.args[0])
    dims = [d % len(x.shape) for d in n.args[1]]
    bdim = None if x.bdim is None else dims.index(x.bdim)
    return b.emit(n, "permute", [x], {"dims": dims}, {}, meta_shape(n), bdim)


@rule(aten.transpose.int, aten.t.default)
def transpose(b, n):
    x = b.ir(n.args[0])
    r = len(x.shape)
    d0, d1 = (n.args[1] % r, n.args[2] % r) if n.target == aten.transpose.int else (0, 1)
    bdim = {d0: d1, d1: d0}.get(x.bdim, x.bdim)
    return b.emit(n, "transpose", [x], {"dim0": d0, "dim1": d1}, {}, meta_shape(n), bdim)


@rule(aten.unsqueeze.default)
def unsqueeze(b, n):
    x = b.ir(n.args[0])
    d = n.args[1] % (len(x.shape) + 1)
    bdim = None if x.bdim is None else x.bdim + (d <= x.bdim)
    return b.emit(n, "unsqueeze", [x], {"dim": d}, {}, meta_shape(n), bdim)


@rule(aten.squeeze.dim, aten.squeeze.dims)
def squeeze(b, n):
    x = b.ir(n.args[0])
    r = len(x.shape)
    ds = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
    ds = sorted(d % r for d in ds if x.shape[d % r] == 1 and d % r != x.bdim)
    bdim = None if x.bdim is None else x.bdim - sum(d < x.bdim for d in ds)
    return b.emit(n, "squeeze", [x], {"dims": ds}, {}, meta_shape(n), bdim)


def select(b, n, x, d: int, index: int, shape):
    if d == x.bdim:
        raise Unsupported("indexing along the batch axis")
    bdim = None if x.bdim is None else x.bdim - (d < x.bdim)
    return b.emit(n, "select", [x], {"dim": d, "index": index % x.shape[d]}, {}, shape, bdim)


@rule(aten.select.int)
def select_int(b, n):
    x = b.ir(n.args[0])
    return select(b, n, x, n.args[1] % len(x.shape), int(n.args[2]), meta_shape(n))


@rule(aten.unbind.int)
def unbind(b, n):
    x = b.ir(n.args[0])
    d = (n.args[1] if len(n.args) > 1 else 0) % len(x.shape)
    n.meta["_sfn_unbind_dim"] = d
    return x


@rule(operator.getitem)
def getitem(b, n):
    src, i = n.args[0], int(n.args[1])
    if not n.users:                      # an output nothing reads (adaptive max pooling's indices)
        return None
    if "_sfn_unbind_dim" in src.meta:
        x = b.ir(src)
        return select(b, n, x, src.meta["_sfn_unbind_dim"], i, meta_shape(n))
    if src.name in b.tuples:
        return b.tuples[src.name][i]
    if i == 0 and src.name in b.env:     # batch norm's (out, mean, invstd), max pool's (out, indices)
        return b.ir(src)
    raise Unsupported("tuple output the converter cannot follow")


def slice_node(b, n, x, d: int, start, end, step: int, shape, name=None):
    if d == x.bdim:
        raise Unsupported("slicing along the batch axis")
    start = 0 if start is None else start
    end = x.shape[d] if end is None else end
    start, end = int(start), int(end)
    start = max(0, min(start + x.shape[d] if start < 0 else start, x.shape[d]))
    end = max(0, min(end + x.shape[d] if end < 0 else end, x.shape[d]))
    if start == 0 and end == x.shape[d] and step == 1:
        return x
    return b.emit(n, "slice", [x], {"dim": d, "start": start, "end": end, "step": int(step)}, {}, shape, x.bdim,
                  name=name)


@rule(aten.slice.Tensor)
def slice_tensor(b, n):
    x = b.ir(n.args[0])
    d = (n.args[1] if len(n.args) > 1 else 0) % len(x.shape)
    return slice_node(b, n, x, d, n.args[2] if len(n.args) > 2 else None, n.args[3] if len(n.args) > 3 else None,
                      n.args[4] if len(n.args) > 4 else 1, meta_shape(n))


@rule(aten.cat.default)
def cat(b, n):
    xs = [b.ir(a) for a in n.args[0]]
    shape = meta_shape(n)
    d = (n.args[1] if len(n.args) > 1 else 0) % len(shape)
    bd = [x.bdim for x in xs if x.bdim is not None]
    bdim = bd[0] if bd else None
    if bdim == d:
        raise Unsupported("concatenation along the batch axis")
    return b.emit(n, "cat", xs, {"dim": d}, {}, shape, bdim)


@rule(aten.expand.default, aten.expand_as.default)
def expand(b, n):
    x, shape = b.ir(n.args[0]), meta_shape(n)
    sym = sym_entries(n)
    sh: list = []
    off = len(shape) - len(x.shape)
    bdim = None if x.bdim is None else x.bdim + off
    if bdim is None and shape and shape[0] == b.batch and (off > 0 or x.shape[0] == 1) and b.batch > 1:
        bdim = 0                      # a stored tensor broadcast over the (static) batch
    for i, s in enumerate(shape):
        if i >= off and x.shape[i - off] == s:
            sh.append(-1)             # kept as it is: the batch axis too, with items folded into it (B·heads) or not
        elif sym[i] or i == bdim:     # broadcast over the batch
            k = s // b.batch if b.batch and s % b.batch == 0 else 1
            sh.append("B" if k == 1 else f"B*{k}")
            bdim = i
        else:
            sh.append(s)
    return b.emit(n, "expand", [x], {"shape": sh}, {}, shape, bdim)


@rule(aten.repeat_interleave.self_int)
def repeat_interleave(b, n):
    """Each entry k times in a row along ``dim`` (GCViT repeats a sample's global query for each of its windows,
    folded into the batch axis): unsqueeze, expand, and merge the two axes."""
    x, k = b.ir(n.args[0]), int(n.args[1])
    dim = arg(n, 2, "dim")
    if dim is None or arg(n, 3, "output_size") not in (None, int(meta_shape(n)[int(dim) % len(x.shape)])):
        raise Unsupported("repeat_interleave without a dim (over the flattened tensor)")
    d, out = int(dim) % len(x.shape), meta_shape(n) or []
    wide = list(x.shape[:d + 1]) + [k] + list(x.shape[d + 1:])
    u = b.emit(n, "unsqueeze", [x], {"dim": d + 1}, {}, wide[:d + 1] + [1] + wide[d + 2:],
               None if x.bdim is None else x.bdim + (x.bdim > d), name=n.name + "_axis")
    e = b.emit(n, "expand", [u], {"shape": [-1] * (d + 1) + [k] + [-1] * (len(wide) - d - 2)}, {}, wide, u.bdim,
               name=n.name + "_copies")
    shape: list = list(out)
    if x.bdim == d:
        shape[d] = f"B*{out[d] // b.batch}"
    elif x.bdim is not None:
        shape[x.bdim] = "B" if x.shape[x.bdim] == b.batch else f"B*{x.shape[x.bdim] // b.batch}"
    return b.emit(n, "reshape", [e], {"shape": shape}, {}, out, x.bdim, outer=b.outer.get(x.name, 1))


def _move_values(b, n, x, split: list, perm: list):
    """Reshape ``x`` to ``split`` ("B" first), permute the axes by ``perm``, reshape to the node's own shape:
    values move, none change (spikes pass through as levels)."""
    full = [x.shape[0], *split[1:]]
    v = b.emit(n, "reshape", [x], {"shape": split}, {}, full, 0, name=n.name + "_split")
    p = b.emit(n, "permute", [v], {"dims": perm}, {}, [full[i] for i in perm], 0, name=n.name + "_permute")
    out = meta_shape(n) or list(x.shape)
    return b.emit(n, "reshape", [p], {"shape": ["B", *out[1:]]}, {}, out, 0)


@rule(aten.pixel_shuffle.default, aten.pixel_unshuffle.default)
def pixel_shuffle(b, n):
    """Pixel (un)shuffle: (C·r², H, W) <-> (C, H·r, W·r)."""
    x, r = b.ir(n.args[0]), int(n.args[1])
    if len(x.shape) != 4 or x.bdim != 0:
        raise Unsupported("pixel shuffle of a value that is not batch × channels × rows × columns")
    c, h, w = x.shape[1:]
    if n.target == aten.pixel_shuffle.default:
        return _move_values(b, n, x, ["B", c // (r * r), r, r, h, w], [0, 1, 4, 2, 5, 3])
    return _move_values(b, n, x, ["B", c, h // r, r, w // r, r], [0, 1, 3, 5, 2, 4])


@rule(aten.channel_shuffle.default, aten.native_channel_shuffle.default)
def channel_shuffle(b, n):
    """ShuffleNet's channel shuffle: the channels as g groups, read group-minor."""
    x, g = b.ir(n.args[0]), int(n.args[1])
    if len(x.shape) < 3 or x.bdim != 0:
        raise Unsupported("channel shuffle of a value that is not batch × channels × …")
    rest = list(x.shape[2:])
    return _move_values(b, n, x, ["B", g, x.shape[1] // g, *rest], [0, 2, 1, *range(3, 3 + len(rest))])


@rule(aten.repeat.default)
def repeat(b, n):
    """A repeat that only tiles axes of size 1 (a position embedding repeated over the batch) is a broadcast."""
    src, out = meta_shape(n.args[0]) or [], meta_shape(n) or []
    off = len(out) - len(src)
    if any(i >= off and src[i - off] != 1 and s != src[i - off] for i, s in enumerate(out)):
        raise Unsupported(f"repeat tiles an axis longer than 1 ({src} -> {out})")
    return expand(b, n)


def batch_reshape(x, out: list[int], sym: list[bool], batch: int, outer: int = 1) -> tuple[list, int | None, int]:
    """Locate the batch axis of a reshape's output: its entry written "B" or "B*k", its index, and how many items
    sit outside the batch within that entry (``outer``; the input's is given).

    Row-major, the input is [P, batch, S]: P items before the batch (the axes before its own, times the items
    outside it within its entry) and S after. An output axis holds the batch when the axes before it divide P
    and those after divide S: it then holds (P / before) · batch · (S / after) items — windows or tokens folded
    into the batch after it ("B*k", ``outer`` 1) or before it (nn.MultiheadAttention's sequence-first
    ``view(tgt_len * bsz, embed)``: ``outer`` = tgt_len); the sizes in "B*k" are all a reshape needs.
    """
    if x.bdim is None:
        return list(out), None, 1
    p, s_in = x.bdim, x.shape
    before = prod(s_in[:p]) * outer
    after = prod(s_in[p + 1:]) * (s_in[p] // (batch * outer))
    candidates = []
    for q in range(len(out)):
        pre, post = prod(out[:q]), prod(out[q + 1:])
        if before % pre == 0 and after % post == 0 and out[q] == (before // pre) * batch * (after // post):
            candidates.append((q, out[q] // batch, before // pre))
    if any(sym):                                       # dynamic export: trust the symbols
        candidates = [c for c in candidates if sym[c[0]]] or candidates
    if not candidates:
        raise Unsupported(f"cannot follow the batch axis through reshape {s_in} -> {out}; "
                          "export the model with a dynamic batch dimension")
    q, k, kept_outside = candidates[0]
    sh: list = list(out)
    sh[q] = "B" if k == 1 else f"B*{k}"
    return sh, q, kept_outside
