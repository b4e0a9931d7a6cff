"""Pooling and reductions over spatial or token axes."""
from __future__ import annotations

import torch

from .builder import Unsupported, meta_shape, pair, rule

aten = torch.ops.aten


def max_pool_attrs(args) -> dict:
    """max_pool{1,2}d's arguments (kernel, stride, padding, dilation, ceil_mode) as max_pool2d attrs (pairs)."""
    k = pair(args[1])
    stride = pair(args[2]) if len(args) > 2 and args[2] else k
    return {"kernel_size": k, "stride": stride, "padding": pair(args[3] if len(args) > 3 else 0),
            "dilation": pair(args[4] if len(args) > 4 else 1), "ceil_mode": bool(args[5]) if len(args) > 5 else False}


def avg_pool_attrs(args) -> dict:
    """avg_pool{1,2}d's arguments as avg_pool2d attrs (pairs)."""
    k = pair(args[1])
    stride = pair(args[2]) if len(args) > 2 and args[2] else k
    return {"kernel_size": k, "stride": stride, "padding": pair(args[3] if len(args) > 3 else 0),
            "ceil_mode": bool(args[4]) if len(args) > 4 else False,
            "count_include_pad": bool(args[5]) if len(args) > 5 else True,
            "divisor_override": args[6] if len(args) > 6 else None}


@rule(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
def max_pool2d(b, n):
    return b.emit(n, "max_pool2d", [n.args[0]], max_pool_attrs(n.args), {}, meta_shape(n, 0))


@rule(aten.avg_pool2d.default)
def avg_pool2d(b, n):
    return b.emit(n, "avg_pool2d", [n.args[0]], avg_pool_attrs(n.args), {}, meta_shape(n))


@rule(aten.avg_pool3d.default)
def avg_pool3d(b, n):
    """3-D average pooling over the first spatial axis only (LocalResponseNorm's window over channels): a 2-D
    pooling of the other two axes flattened into one, kernel 1 along it."""
    x = b.ir(n.args[0])
    k = list(n.args[1])
    stride = list(n.args[2]) if len(n.args) > 2 and n.args[2] else k
    pad = list(n.args[3]) if len(n.args) > 3 else [0, 0, 0]
    if len(x.shape) != 5 or x.bdim != 0 or k[1:] != [1, 1] or stride[1:] != [1, 1] or any(pad[1:]):
        raise Unsupported(f"3-D average pooling with kernel {k}, stride {stride}: only windows along the first "
                          "spatial axis")
    c, d, h, w = x.shape[1:]
    out = meta_shape(n) or []
    flat = b.emit(n, "reshape", [x], {"shape": ["B", c, d, h * w]}, {}, [x.shape[0], c, d, h * w], 0,
                  name=n.name + "_flat")
    attrs = avg_pool_attrs([None, [k[0], 1], [stride[0], 1], [pad[0], 0], *n.args[4:]])
    pooled = b.emit(n, "avg_pool2d", [flat], attrs, {}, [x.shape[0], c, out[2], h * w], 0, name=n.name + "_pool")
    return b.emit(n, "reshape", [pooled], {"shape": ["B", *out[1:]]}, {}, out, 0)


@rule(aten.adaptive_max_pool2d.default)
def adaptive_max_pool2d(b, n):
    """Adaptive max pooling to a size that divides the input: max pooling with kernel = stride = input / output."""
    x, out = b.ir(n.args[0]), pair(n.args[1])
    h, w = x.shape[-2:]
    if h % out[0] or w % out[1]:
        raise Unsupported(f"adaptive max pooling {h}×{w} -> {out[0]}×{out[1]}: only sizes that divide the input")
    k = [h // out[0], w // out[1]]
    attrs = {"kernel_size": k, "stride": k, "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}
    return b.emit(n, "max_pool2d", [x], attrs, {}, meta_shape(n, 0))


@rule(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(b, n):
    return b.emit(n, "adaptive_avg_pool2d", [n.args[0]], {"output_size": pair(n.args[1])}, {}, meta_shape(n))


@rule(aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default, aten._upsample_nearest_exact2d.vec,
      aten._upsample_nearest_exact2d.default)
def upsample_nearest(b, n):
    """Nearest upsampling (HRNet's fuse layers, FPNs) copies rows and columns: the source row and column of every
    output one, found by running the very operator on row and column numbers (torch's own index arithmetic)."""
    x = b.ir(n.args[0])
    if len(x.shape) != 4 or x.bdim != 0:
        raise Unsupported("nearest upsampling of a value that is not batch × channels × rows × columns")
    h, w = x.shape[2:]
    with torch.no_grad():
        rows = n.target(torch.arange(h, dtype=torch.float32).reshape(1, 1, h, 1).expand(1, 1, h, w).contiguous(),
                        *n.args[1:], **n.kwargs)
        cols = n.target(torch.arange(w, dtype=torch.float32).reshape(1, 1, 1, w).expand(1, 1, h, w).contiguous(),
                        *n.args[1:], **n.kwargs)
    return b.emit(n, "upsample_nearest", [x], {"rows": [int(v) for v in rows[0, 0, :, 0]],
                                               "cols": [int(v) for v in cols[0, 0, 0, :]]}, {}, meta_shape(n))


@rule(aten.amax.default)
def amax(b, n):
    x = b.ir(n.args[0])
    dims = n.args[1] if len(n.args) > 1 else []
    dims = sorted(d % len(x.shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
    if not dims or x.bdim in dims:
        raise Unsupported("maximum over the batch axis")
    bdim = None if x.bdim is None else (x.bdim if keep else x.bdim - sum(d < x.bdim for d in dims))
    return b.emit(n, "amax", [x], {"dims": dims, "keepdim": keep}, {}, meta_shape(n), bdim)


@rule(aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default)
def upsample_bilinear(b, n):
    """Bilinear upsampling (EfficientFormer-V2, FPNs): a host op replaying torch's own operator with the
    arguments it was called with (scale factors, when given, set the sampling positions, as in torch)."""
    x, out = b.ir(n.args[0]), meta_shape(n) or []
    if len(x.shape) != 4 or x.bdim != 0:
        raise Unsupported("bilinear upsampling of a value that is not batch × channels × rows × columns")
    if n.target == aten.upsample_bilinear2d.vec:
        align, scales = bool(n.args[2]), n.args[3] if len(n.args) > 3 else None
    else:
        align = bool(n.args[2])
        sh, sw = (n.args[3] if len(n.args) > 3 else None), (n.args[4] if len(n.args) > 4 else None)
        scales = None if sh is None or sw is None else [sh, sw]
    attrs = {"size": [int(v) for v in out[2:]], "align_corners": align,
             "scales": None if scales is None else [float(v) for v in scales]}
    return b.emit(n, "upsample_bilinear", [x], attrs, {}, out)


@rule(aten.mean.dim, aten.sum.dim_IntList)
def mean(b, n):
    x = b.ir(n.args[0])
    dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
    dims = sorted(d % len(x.shape) for d in dims)
    keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
    if x.bdim in dims:
        raise Unsupported("reduction over the batch axis")
    bdim = None if x.bdim is None else (x.bdim if keep else x.bdim - sum(d < x.bdim for d in dims))
    op = "mean" if n.target == aten.mean.dim else "sum"
    return b.emit(n, op, [x], {"dims": dims, "keepdim": keep}, {}, meta_shape(n), bdim)
