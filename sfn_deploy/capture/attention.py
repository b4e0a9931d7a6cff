"""Fused attention, split into q·kᵀ, scale, (mask,) softmax and ·v so the post-softmax neuron has a place."""
from __future__ import annotations

import math

import torch

from ..ir import Node
from .builder import Unsupported, meta_shape, rule

aten = torch.ops.aten
# what a masked-out score becomes: the most negative float32 (as Hugging Face does), not −inf, which a stored
# tensor may not hold; exp() of it is 0, as of −inf
MASKED = torch.finfo(torch.float32).min


def _mask(b, n, mask, causal: bool, s_shape: list[int]):
    """The additive mask node (None without one): a stored mask (boolean: where attention may look) or causal
    order becomes a constant; a float mask computed by the model is added as it is."""
    if mask is not None and not b.is_param(mask):
        m = b.ir(mask)
        val = mask.meta.get("val")
        if causal or (isinstance(val, torch.Tensor) and val.dtype == torch.bool):
            raise Unsupported("a boolean or causal attention mask computed from the input")
        return m
    t = None
    if mask is not None:
        t = b.stored(mask.name)
        t = torch.zeros(t.shape).masked_fill(~t, MASKED) if t.dtype == torch.bool else t.float()
    if causal:
        L, S = s_shape[-2:]
        c = torch.zeros(L, S).masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), MASKED)
        t = c if t is None else torch.maximum(t + c, torch.tensor(MASKED))
    if t is None:
        return None
    return b.add(Node(n.name + "_mask", "constant", [], {}, {"value": t}, list(t.shape), None, n.name))


@rule(aten.scaled_dot_product_attention.default)
def scaled_dot_product_attention(b, n):
    q, k, v = (b.ir(a) for a in n.args[:3])
    kw = dict(n.kwargs)
    for name, a in zip(["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"], n.args[3:], strict=False):
        kw[name] = a
    if kw.get("enable_gqa"):
        raise Unsupported("grouped-query attention (enable_gqa)")
    scale = kw.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    r = len(k.shape)
    kt_shape = list(k.shape[:-2]) + [k.shape[-1], k.shape[-2]]
    kt = b.emit(n, "transpose", [k], {"dim0": r - 2, "dim1": r - 1}, {}, kt_shape, k.bdim, n.name + "_kT")
    s_shape = list(q.shape[:-1]) + [k.shape[-2]]
    scores = b.emit(n, "matmul", [q, kt], {}, {}, s_shape, name=n.name + "_qk")
    scaled = b.emit(n, "mul", [scores], {"other": float(scale)}, {}, s_shape, name=n.name + "_scale")
    mask = _mask(b, n, kw.get("attn_mask"), bool(kw.get("is_causal")), s_shape)
    if mask is not None:
        scaled = b.emit(n, "add", [scaled, mask], {}, {}, s_shape, name=n.name + "_masked")
    attn = b.emit(n, "softmax", [scaled], {"dim": len(s_shape) - 1}, {}, s_shape, name=n.name + "_softmax")
    return b.emit(n, "matmul", [attn, v], {}, {}, meta_shape(n), name=n.name + "_av")
