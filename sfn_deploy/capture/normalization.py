"""Normalisation layers (host ops; an inference BatchNorm after a weight layer is folded later)."""
from __future__ import annotations

import torch

from .builder import Unsupported, arg, meta_shape, rule

aten = torch.ops.aten


@rule(aten.layer_norm.default)
def layer_norm(b, n):
    args = n.args
    params = {}
    if len(args) > 2 and args[2] is not None:
        params["weight"] = b.param(args[2])
    if len(args) > 3 and args[3] is not None:
        params["bias"] = b.param(args[3])
    eps = float(args[4]) if len(args) > 4 else 1e-5
    attrs = {"normalized_shape": [int(s) for s in args[1]], "eps": eps}
    return b.emit(n, "layer_norm", [args[0]], attrs, params, meta_shape(n))


@rule(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
def batch_norm(b, n):
    if n.target == aten.batch_norm.default:
        x, w, bias, mean, var, training, _, eps = n.args[:8]
        if training:
            raise Unsupported("BatchNorm in training mode; call model.eval() before exporting")
    else:
        x, w, bias, mean, var, _, eps = n.args[:7]
    params = {"running_mean": b.param(mean), "running_var": b.param(var)}
    if w is not None:
        params["weight"] = b.param(w)
    if bias is not None:
        params["bias"] = b.param(bias)
    shape = meta_shape(n, 0)
    return b.emit(n, "batch_norm", [x], {"eps": float(eps)}, params, shape if shape is not None else b.ir(x).shape)


@rule(aten.group_norm.default)
def group_norm(b, n):
    x = n.args[0]
    params = {}
    if arg(n, 2, "weight") is not None:
        params["weight"] = b.param(arg(n, 2, "weight"))
    if arg(n, 3, "bias") is not None:
        params["bias"] = b.param(arg(n, 3, "bias"))
    attrs = {"num_groups": int(arg(n, 1, "num_groups")), "eps": float(arg(n, 4, "eps", 1e-5))}
    return b.emit(n, "group_norm", [x], attrs, params, meta_shape(n))


@rule(aten.instance_norm.default)
def instance_norm(b, n):
    """InstanceNorm normalises each sample's channel over its positions: a GroupNorm with one channel per group
    (with tracked statistics at inference: a BatchNorm)."""
    x, w, bias, mean, var, use_input_stats = n.args[:6]
    eps = float(arg(n, 7, "eps", 1e-5))
    affine = {k: b.param(v) for k, v in (("weight", w), ("bias", bias)) if v is not None}
    shape = meta_shape(n) or []
    if not use_input_stats:
        params = {"running_mean": b.param(mean), "running_var": b.param(var), **affine}
        return b.emit(n, "batch_norm", [x], {"eps": eps}, params, shape)
    return b.emit(n, "group_norm", [x], {"num_groups": int(shape[1]), "eps": eps}, affine, shape)


@rule(aten.linalg_vector_norm.default)
def vector_norm(b, n):
    x = b.ir(n.args[0])
    order = float(arg(n, 1, "ord", 2.0))
    dims = arg(n, 2, "dim")
    dims = list(range(len(x.shape))) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % len(x.shape) for d in dims)
    keep = bool(arg(n, 3, "keepdim", False))
    if x.bdim in dims:
        raise Unsupported("norm over the batch axis")
    if order not in (1.0, 2.0):
        raise Unsupported(f"vector norm of order {order} (orders 1 and 2 are supported)")
    bdim = None if x.bdim is None else (x.bdim if keep else x.bdim - sum(d < x.bdim for d in dims))
    return b.emit(n, "vector_norm", [x], {"ord": order, "dims": dims, "keepdim": keep}, {}, meta_shape(n), bdim)
