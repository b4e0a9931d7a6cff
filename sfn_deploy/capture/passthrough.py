"""Operators that carry no computation at inference: copies, dropout, shape queries and asserts."""
from __future__ import annotations

import operator

import torch

from .builder import Unsupported, rule

aten = torch.ops.aten


@rule(aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.feature_dropout_.default,
      aten.alpha_dropout.default, aten.alpha_dropout_.default, aten.feature_alpha_dropout.default,
      aten.feature_alpha_dropout_.default, aten.clone.default, aten.alias.default, aten.detach.default,
      aten.contiguous.default, aten.lift_fresh_copy.default)
def identity(b, n):
    return b.ir(n.args[0])


@rule(aten.sym_size.int, aten.sym_numel.default, aten._assert_tensor_metadata.default, aten._assert_scalar.default)
def no_data(b, n):
    return None


@rule(operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.truediv, operator.neg,
      torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min)
def size_arithmetic(b, n):
    """Arithmetic on sizes (nn.MultiheadAttention's ``bsz * num_heads`` under a dynamic batch): no data; the
    reshapes that use the result read their shapes from the example."""
    if isinstance(n.meta.get("val"), torch.Tensor):
        raise Unsupported("Python arithmetic on a tensor in an ATen graph")
    return None


if hasattr(torch.ops.higher_order, "wrap_with_autocast"):
    @rule(torch.ops.higher_order.wrap_with_autocast)
    def autocast(b, n):
        """Regions with autocast disabled are inlined before the rules run (builder._inline_float32_regions)."""
        raise Unsupported(f"a mixed-precision autocast region ({n.args[1]}): the converted network computes in "
                          "float32; export the model without autocast")
