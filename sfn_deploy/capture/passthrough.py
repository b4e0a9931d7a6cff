"""Operators that carry no computation at inference: copies, dropout, shape queries and asserts."""
from __future__ import annotations

import torch

from .builder import rule

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
