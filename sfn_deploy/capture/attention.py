"""Fused attention, split into q·kᵀ, scale, softmax and ·v so the post-softmax neuron has a place."""
from __future__ import annotations

import math

import torch

from .builder import Unsupported, meta_shape, rule

aten = torch.ops.aten


@rule(aten.scaled_dot_product_attention.default)
def scaled_dot_product_attention(b, n):
    q, k, v = (b.ir(a) for a in n.args[:3])
    kw = dict(n.kwargs)
    for name, a in zip(["attn_mask", "dropout_p", "is_causal", "scale"], n.args[3:], strict=False):
        kw[name] = a
    if kw.get("attn_mask") is not None or kw.get("is_causal"):
        raise Unsupported("attention masks and causal attention are not supported yet")
    scale = kw.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    r = len(k.shape)
    kt_shape = list(k.shape[:-2]) + [k.shape[-1], k.shape[-2]]
    kt = b.emit(n, "transpose", [k], {"dim0": r - 2, "dim1": r - 1}, {}, kt_shape, k.bdim, n.name + "_kT")
    s_shape = list(q.shape[:-1]) + [k.shape[-2]]
    scores = b.emit(n, "matmul", [q, kt], {}, {}, s_shape, name=n.name + "_qk")
    scaled = b.emit(n, "mul", [scores], {"other": float(scale)}, {}, s_shape, name=n.name + "_scale")
    attn = b.emit(n, "softmax", [scaled], {"dim": len(s_shape) - 1}, {}, s_shape, name=n.name + "_softmax")
    return b.emit(n, "matmul", [attn, v], {}, {}, meta_shape(n), name=n.name + "_av")
