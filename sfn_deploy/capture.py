"""Graph capture: a torch.export program (or an nn.Module, exported here) → :class:`Graph`.

One handler per ATen operator maps it onto the small op vocabulary of ``ir.OPS``.
Fused attention (``scaled_dot_product_attention``) is split into q·kᵀ, scale,
softmax and ·v so the post-softmax neuron has a place. Every operator without a
handler is collected and reported at once, with the module path and source line.
"""
from __future__ import annotations

import math
import operator

import torch
from torch.export import ExportedProgram

from .errors import UnsupportedOpsError, UserError
from .ir import Graph, Node, nonfinite

aten = torch.ops.aten

# ops that pass data through unchanged in inference
_IDENTITY = {aten.dropout.default, aten.clone.default, aten.alias.default, aten.detach.default,
             aten.contiguous.default, aten.lift_fresh_copy.default, aten.feature_dropout.default}
_SKIP = {aten.sym_size.int, aten.sym_numel.default, aten._assert_tensor_metadata.default,
         aten._assert_scalar.default}
_ELTWISE_BIN = {aten.add.Tensor: "add", aten.add_.Tensor: "add", aten.sub.Tensor: "sub",
                aten.mul.Tensor: "mul", aten.mul_.Tensor: "mul", aten.div.Tensor: "div"}
_UNARY = {aten.relu.default: "relu", aten.relu_.default: "relu", aten.gelu.default: "gelu"}


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


def _concrete(s) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise UserError(f"symbolic size {s} has no example value; export with a concrete example input")
        return int(hint)
    return int(s)


def _meta_shape(fx_node) -> list[int] | None:
    val = fx_node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [_concrete(s) for s in val.shape]
    return None


def _sym_entries(fx_node) -> list[bool]:
    val = fx_node.meta.get("val")
    return [isinstance(s, torch.SymInt) and not isinstance(s.node.maybe_as_int(), int) for s in val.shape]


def _where(fx_node) -> str:
    stack = fx_node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    trace = fx_node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    loc = ""
    if lines:
        parts = lines[-1].split('"')
        if len(parts) >= 3:
            lineno = parts[2].split(",")[1].strip().replace("line ", "")
            loc = f"{parts[1].rsplit('/', 1)[-1]}:{lineno}"
    return ", ".join(x for x in (path, loc) if x) or "unknown location"


class _Builder:
    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        sig = ep.graph_signature
        self.state: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}       # placeholder -> "parameter 'fc1.weight'" (for messages)
        self.checked: set[str] = set()
        for ph, key in sig.inputs_to_parameters.items():
            self.state[ph] = ep.state_dict[key].detach()
            self.origin[ph] = f"parameter {key!r}"
        for ph, key in sig.inputs_to_buffers.items():
            self.state[ph] = (ep.state_dict[key] if key in ep.state_dict else ep.constants[key]).detach()
            self.origin[ph] = f"buffer {key!r}"
        for ph, key in sig.inputs_to_lifted_tensor_constants.items():
            self.state[ph] = ep.constants[key].detach()
            self.origin[ph] = f"tensor constant {key!r}"
        self.nodes: list[Node] = []
        self.index: dict[str, Node] = {}
        self.env: dict[str, str] = {}          # fx node name -> IR node name
        self.problems: list[str] = []
        self.batch = None

    # -- helpers ---------------------------------------------------------
    def add(self, node: Node) -> Node:
        base, k = node.name, 1
        while node.name in self.index:
            k += 1
            node.name = f"{base}_{k}"
        self.nodes.append(node)
        self.index[node.name] = node
        return node

    def ir(self, arg) -> Node:
        if isinstance(arg, torch.fx.Node):
            if arg.name in self.env:
                return self.index[self.env[arg.name]]
            if arg.name in self.state:      # a parameter used as data
                t = self.stored(arg.name)
                node = self.add(Node(arg.name, "constant", [], {}, {"value": t}, list(t.shape), None,
                                     arg.name))
                self.env[arg.name] = node.name
                return node
        raise _Unsupported(f"argument {arg!r} is not a tensor the converter can follow")

    def param(self, arg) -> torch.Tensor | None:
        if arg is None:
            return None
        if isinstance(arg, torch.fx.Node) and arg.name in self.state:
            return self.stored(arg.name)
        raise _Unsupported("weights must be stored parameters, not computed tensors")

    def stored(self, ph: str) -> torch.Tensor:
        """A stored tensor the graph reads (parameter, buffer or constant), refused when it holds NaN/Inf:
        the converted network would compute NaN silently (and a saved model holding one does not load)."""
        t = self.state[ph]
        if ph not in self.checked:
            bad = nonfinite(t)
            if bad:
                raise UserError(f"{self.origin.get(ph, repr(ph))} holds NaN/Inf values ({bad} of {t.numel()})")
            self.checked.add(ph)
        return t

    def is_param(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.name in self.state and arg.name not in self.env

    def emit(self, fx_node, op, inputs, attrs=None, params=None, shape=None, bdim="same", name=None):
        ins = [i if isinstance(i, Node) else self.ir(i) for i in inputs]
        if bdim == "same":
            bdim = _rank_aligned_bdim(ins, len(shape) if shape is not None else len(ins[0].shape))
        node = Node(name or fx_node.name, op, [i.name for i in ins], attrs or {}, params or {},
                    list(shape) if shape is not None else list(ins[0].shape), bdim, _where(fx_node))
        return self.add(node)

    # -- main ---------------------------------------------------------------
    def build(self) -> Graph:
        gm = self.ep.graph_module
        user_inputs = [s.arg.name for s in self.ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        if len(user_inputs) != 1:
            raise UserError(f"the model must take exactly one tensor input, it takes {len(user_inputs)}")
        out_node = None
        for fx_node in gm.graph.nodes:
            if fx_node.op == "placeholder":
                if fx_node.name == user_inputs[0]:
                    shape = _meta_shape(fx_node)
                    self.batch = shape[0]
                    self.env[fx_node.name] = self.add(Node("input", "input", [], {}, {}, shape, 0, "input")).name
                continue
            if fx_node.op == "output":
                outs = fx_node.args[0]
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                if len(outs) != 1:
                    raise UserError(f"the model must return one tensor (the logits), it returns {len(outs)}")
                out_node = outs[0]
                continue
            if fx_node.op != "call_function":
                self.problems.append(f"{fx_node.op} {fx_node.target} at {_where(fx_node)}")
                continue
            try:
                self.handle(fx_node)
            except _Unsupported as e:
                self.problems.append(f"{_op_name(fx_node.target)} at {_where(fx_node)}: {e}")
                shape = _meta_shape(fx_node)
                if shape is not None:   # a stand-in, so later nodes are still checked for their own problems
                    self.env[fx_node.name] = self.add(Node(fx_node.name, "constant", [], {}, {}, shape, 0)).name
        if self.problems:
            raise UnsupportedOpsError(self.problems)
        graph = Graph(self.nodes, self.ir(out_node).name)
        for n in graph.nodes:                     # per-sample shapes from here on
            if n.bdim is not None and n.shape:
                n.shape[n.bdim] = 1
        return _prune(graph)

    def handle(self, n):
        t, args, kw = n.target, n.args, n.kwargs
        shape = _meta_shape(n)
        if t in _SKIP:
            return
        if t in _IDENTITY:
            self.env[n.name] = self.ir(args[0]).name
            return
        if t in (aten.conv2d.default, aten.convolution.default):
            if t == aten.convolution.default:
                x, w, b, stride, padding, dilation, transposed, _, groups = args
                if transposed:
                    raise _Unsupported("transposed convolution")
            else:
                x, w = args[0], args[1]
                rest = list(args[2:]) + [None] * 5
                b = rest[0]
                stride, padding, dilation, groups = (rest[1] or [1, 1], rest[2] or [0, 0], rest[3] or [1, 1],
                                                     rest[4] or 1)
            weight = self.param(w)
            if weight.dim() != 4:
                raise _Unsupported("only 2-D convolutions are supported")
            params = {"weight": weight}
            if b is not None:
                params["bias"] = self.param(b)
            attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation),
                     "groups": int(groups)}
            self.env[n.name] = self.emit(n, "conv2d", [args[0]], attrs, params, shape).name
            return
        if t == aten.linear.default:
            params = {"weight": self.param(args[1])}
            if len(args) > 2 and args[2] is not None:
                params["bias"] = self.param(args[2])
            self.env[n.name] = self.emit(n, "linear", [args[0]], {}, params, shape).name
            return
        if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            a, b = args[0], args[1]
            if self.is_param(b) and self.state[b.name].dim() == 2:
                node = self.emit(n, "linear", [a], {}, {"weight": self.stored(b.name).t().contiguous()}, shape)
            elif self.is_param(a) or self.is_param(b):
                raise _Unsupported("product with a stored tensor that is not a 2-D weight matrix")
            else:
                node = self.emit(n, "matmul", [a, b], {}, {}, shape)
            self.env[n.name] = node.name
            return
        if t == aten.addmm.default:
            bias, x, w = args[0], args[1], args[2]
            params = {"weight": self.param(w).t().contiguous(), "bias": self.param(bias)}
            self.env[n.name] = self.emit(n, "linear", [x], {}, params, shape).name
            return
        if t in _UNARY:
            attrs = {"approximate": kw.get("approximate", args[1] if len(args) > 1 else "none")} \
                if _UNARY[t] == "gelu" else {}
            self.env[n.name] = self.emit(n, _UNARY[t], [args[0]], attrs, {}, shape).name
            return
        if t in (aten.softmax.int, aten._softmax.default):
            dim = args[1] % len(shape)
            self.env[n.name] = self.emit(n, "softmax", [args[0]], {"dim": dim}, {}, shape).name
            return
        if t == aten.layer_norm.default:
            nshape = [int(s) for s in args[1]]
            params = {}
            if len(args) > 2 and args[2] is not None:
                params["weight"] = self.param(args[2])
            if len(args) > 3 and args[3] is not None:
                params["bias"] = self.param(args[3])
            eps = float(args[4]) if len(args) > 4 else 1e-5
            self.env[n.name] = self.emit(n, "layer_norm", [args[0]], {"normalized_shape": nshape, "eps": eps},
                                         params, shape).name
            return
        if t in (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default):
            if t == aten.batch_norm.default:
                x, w, b, mean, var, training, _, eps = args[:8]
                if training:
                    raise _Unsupported("BatchNorm in training mode; call model.eval() before exporting")
            else:
                x, w, b, mean, var, _, eps = args[:7]
            params = {"running_mean": self.param(mean), "running_var": self.param(var)}
            if w is not None:
                params["weight"] = self.param(w)
            if b is not None:
                params["bias"] = self.param(b)
            node = self.emit(n, "batch_norm", [x], {"eps": float(eps)}, params,
                             shape if shape is not None else self.ir(x).shape)
            self.env[n.name] = node.name
            return
        if t in _ELTWISE_BIN:
            op = _ELTWISE_BIN[t]
            a, b = args[0], args[1]
            alpha = kw.get("alpha", 1)
            if not isinstance(a, torch.fx.Node):
                if op in ("add", "mul"):
                    a, b = b, a
                else:
                    raise _Unsupported("scalar on the left of a subtraction or division")
            attrs = {"alpha": alpha} if alpha != 1 else {}
            if isinstance(b, torch.fx.Node):
                node = self.emit(n, op, [a, b], attrs, {}, shape)
            else:
                attrs["other"] = float(b)
                node = self.emit(n, op, [a], attrs, {}, shape)
            self.env[n.name] = node.name
            return
        if t == aten.scaled_dot_product_attention.default:
            self.split_attention(n, shape)
            return
        if t in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default):
            k = _pair(args[1])
            stride = _pair(args[2]) if len(args) > 2 and args[2] else k
            attrs = {"kernel_size": k, "stride": stride, "padding": _pair(args[3] if len(args) > 3 else 0),
                     "dilation": _pair(args[4] if len(args) > 4 else 1),
                     "ceil_mode": bool(args[5]) if len(args) > 5 else False}
            self.env[n.name] = self.emit(n, "max_pool2d", [args[0]], attrs, {}, shape or
                                         _meta_shape_first(n)).name
            return
        if t == aten.avg_pool2d.default:
            k = _pair(args[1])
            stride = _pair(args[2]) if len(args) > 2 and args[2] else k
            attrs = {"kernel_size": k, "stride": stride, "padding": _pair(args[3] if len(args) > 3 else 0),
                     "ceil_mode": bool(args[4]) if len(args) > 4 else False,
                     "count_include_pad": bool(args[5]) if len(args) > 5 else True,
                     "divisor_override": args[6] if len(args) > 6 else None}
            self.env[n.name] = self.emit(n, "avg_pool2d", [args[0]], attrs, {}, shape).name
            return
        if t in (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default):
            self.env[n.name] = self.emit(n, "adaptive_avg_pool2d", [args[0]],
                                         {"output_size": _pair(args[1])}, {}, shape).name
            return
        if t == aten.mean.dim:
            x = self.ir(args[0])
            dims = sorted(d % len(x.shape) for d in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]]))
            keep = bool(args[2]) if len(args) > 2 else bool(kw.get("keepdim", False))
            if x.bdim in dims:
                raise _Unsupported("mean over the batch axis")
            bdim = None if x.bdim is None else (x.bdim if keep else x.bdim - sum(d < x.bdim for d in dims))
            self.env[n.name] = self.emit(n, "mean", [x], {"dims": dims, "keepdim": keep}, {}, shape, bdim).name
            return
        # ---- layout ----
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            x = self.ir(args[0])
            sh, bdim = _batch_reshape(x, shape, _sym_entries(n))
            self.env[n.name] = self.emit(n, "reshape", [x], {"shape": sh}, {}, shape, bdim).name
            return
        if t == aten.flatten.using_ints:
            x = self.ir(args[0])
            r = len(x.shape)
            s, e = (args[1] if len(args) > 1 else 0) % r, (args[2] if len(args) > 2 else -1) % r
            if x.bdim is not None and s <= x.bdim <= e and s != e:
                raise _Unsupported("flattening the batch axis into others")
            bdim = None if x.bdim is None else (x.bdim if x.bdim < s else x.bdim - (e - s) if x.bdim > e else s)
            self.env[n.name] = self.emit(n, "flatten", [x], {"start": s, "end": e}, {}, shape, bdim).name
            return
        if t == aten.permute.default:
            x = self.ir(args[0])
            dims = [d % len(x.shape) for d in args[1]]
            bdim = None if x.bdim is None else dims.index(x.bdim)
            self.env[n.name] = self.emit(n, "permute", [x], {"dims": dims}, {}, shape, bdim).name
            return
        if t in (aten.transpose.int, aten.t.default):
            x = self.ir(args[0])
            r = len(x.shape)
            d0, d1 = (args[1] % r, args[2] % r) if t == aten.transpose.int else (0, 1)
            bdim = x.bdim
            if bdim == d0:
                bdim = d1
            elif bdim == d1:
                bdim = d0
            self.env[n.name] = self.emit(n, "transpose", [x], {"dim0": d0, "dim1": d1}, {}, shape, bdim).name
            return
        if t == aten.unsqueeze.default:
            x = self.ir(args[0])
            d = args[1] % (len(x.shape) + 1)
            bdim = None if x.bdim is None else x.bdim + (d <= x.bdim)
            self.env[n.name] = self.emit(n, "unsqueeze", [x], {"dim": d}, {}, shape, bdim).name
            return
        if t in (aten.squeeze.dim, aten.squeeze.dims):
            x = self.ir(args[0])
            ds = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            ds = sorted(d % len(x.shape) for d in ds if x.shape[d % len(x.shape)] == 1 and d % len(x.shape) != x.bdim)
            bdim = None if x.bdim is None else x.bdim - sum(d < x.bdim for d in ds)
            self.env[n.name] = self.emit(n, "squeeze", [x], {"dims": ds}, {}, shape, bdim).name
            return
        if t == aten.select.int:
            x = self.ir(args[0])
            d = args[1] % len(x.shape)
            self.env[n.name] = self._select(n, x, d, int(args[2]), shape).name
            return
        if t == aten.unbind.int:
            x = self.ir(args[0])
            d = (args[1] if len(args) > 1 else 0) % len(x.shape)
            self.env[n.name] = x.name
            n.meta["_sfn_unbind_dim"] = d
            return
        if t == operator.getitem:
            src = args[0]
            if "_sfn_unbind_dim" in src.meta:
                x = self.ir(src)
                self.env[n.name] = self._select(n, x, src.meta["_sfn_unbind_dim"], int(args[1]), shape).name
            elif args[1] == 0 and src.name in self.env:     # batch norm's (out, mean, invstd)
                self.env[n.name] = self.env[src.name]
            else:
                raise _Unsupported("tuple output the converter cannot follow")
            return
        if t == aten.slice.Tensor:
            x = self.ir(args[0])
            d = (args[1] if len(args) > 1 else 0) % len(x.shape)
            if d == x.bdim:
                raise _Unsupported("slicing along the batch axis")
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else x.shape[d]
            step = args[4] if len(args) > 4 else 1
            start, end = max(0, min(int(start), x.shape[d])), max(0, min(int(end), x.shape[d]))
            if start == 0 and end == x.shape[d] and step == 1:
                self.env[n.name] = x.name
                return
            self.env[n.name] = self.emit(n, "slice", [x], {"dim": d, "start": start, "end": end, "step": int(step)},
                                         {}, shape, x.bdim).name
            return
        if t == aten.cat.default:
            xs = [self.ir(a) for a in args[0]]
            d = (args[1] if len(args) > 1 else 0) % len(shape)
            bd = [x.bdim for x in xs if x.bdim is not None]
            bdim = bd[0] if bd else None
            if bdim == d:
                raise _Unsupported("concatenation along the batch axis")
            self.env[n.name] = self.emit(n, "cat", xs, {"dim": d}, {}, shape, bdim).name
            return
        if t == aten.expand.default:
            x = self.ir(args[0])
            sym = _sym_entries(n)
            sh: list = []
            off = len(shape) - len(x.shape)
            bdim = None if x.bdim is None else x.bdim + off
            if bdim is None and shape and shape[0] == self.batch and (off > 0 or x.shape[0] == 1) \
                    and self.batch > 1:
                bdim = 0                      # a stored tensor broadcast over the (static) batch
            for i, s in enumerate(shape):
                if sym[i] or i == bdim:
                    sh.append("B")
                    bdim = i
                elif i >= off and x.shape[i - off] == s:
                    sh.append(-1)
                else:
                    sh.append(s)
            self.env[n.name] = self.emit(n, "expand", [x], {"shape": sh}, {}, shape, bdim).name
            return
        raise _Unsupported("no conversion rule for this operator")

    def _select(self, n, x: Node, d: int, index: int, shape) -> Node:
        if d == x.bdim:
            raise _Unsupported("indexing along the batch axis")
        bdim = None if x.bdim is None else x.bdim - (d < x.bdim)
        index = index % x.shape[d]
        return self.emit(n, "select", [x], {"dim": d, "index": index}, {}, shape, bdim)

    def split_attention(self, n, shape):
        q, k, v = (self.ir(a) for a in n.args[:3])
        kw = dict(n.kwargs)
        names = ["attn_mask", "dropout_p", "is_causal", "scale"]
        for i, a in enumerate(n.args[3:]):
            kw[names[i]] = a
        if kw.get("attn_mask") is not None or kw.get("is_causal"):
            raise _Unsupported("attention masks and causal attention are not supported yet")
        d = q.shape[-1]
        scale = kw.get("scale") or 1.0 / math.sqrt(d)
        r = len(k.shape)
        kt_shape = list(k.shape[:-2]) + [k.shape[-1], k.shape[-2]]
        kt = self.emit(n, "transpose", [k], {"dim0": r - 2, "dim1": r - 1}, {}, kt_shape, k.bdim, n.name + "_kT")
        s_shape = list(q.shape[:-1]) + [k.shape[-2]]
        scores = self.emit(n, "matmul", [q, kt], {}, {}, s_shape, name=n.name + "_qk")
        scaled = self.emit(n, "mul", [scores], {"other": float(scale)}, {}, s_shape, name=n.name + "_scale")
        attn = self.emit(n, "softmax", [scaled], {"dim": len(s_shape) - 1}, {}, s_shape, name=n.name + "_softmax")
        out = self.emit(n, "matmul", [attn, v], {}, {}, shape, name=n.name + "_av")
        self.env[n.name] = out.name


class _Unsupported(Exception):
    pass


def _op_name(target) -> str:
    return str(target)


def _pair(v) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [int(v[0]), int(v[-1])] if len(v) else [0, 0]
    return [int(v), int(v)]


def _meta_shape_first(n):
    val = n.meta.get("val")
    return [_concrete(s) for s in val[0].shape]


def _rank_aligned_bdim(ins: list[Node], out_rank: int) -> int | None:
    for i in ins:
        if i.bdim is not None:
            return i.bdim + (out_rank - len(i.shape))
    return None


def _batch_reshape(x: Node, out: list[int], sym: list[bool]) -> tuple[list, int | None]:
    """Locate the batch axis of a reshape's output and write its entry as "B" or "B*k"."""
    if x.bdim is None:
        return list(out), None
    p, s_in = x.bdim, x.shape
    b = s_in[p]
    before = _prod(s_in[:p])
    candidates = []
    for q in range(len(out)):
        if _prod(out[:q]) != before:
            continue
        k, j = 1, p + 1
        while True:
            if out[q] == b * k:
                candidates.append((q, k))
                break
            if j >= len(s_in) or b * k > out[q]:
                break
            k *= s_in[j]
            j += 1
    if any(sym):                                       # dynamic export: trust the symbols
        candidates = [c for c in candidates if sym[c[0]]] or candidates
    if not candidates:
        raise _Unsupported(f"cannot follow the batch axis through reshape {s_in} -> {out}; "
                           "export the model with a dynamic batch dimension")
    q, k = candidates[0]
    sh: list = list(out)
    sh[q] = "B" if k == 1 else f"B*{k}"
    return sh, q


def _prune(graph: Graph) -> Graph:
    """Drop nodes the output does not depend on (shape computations, unused constants)."""
    live = {graph.output}
    for n in reversed(graph.nodes):
        if n.name in live:
            live.update(n.inputs)
    graph.nodes = [n for n in graph.nodes if n.name in live or n.op == "input"]
    graph.reindex()
    return graph


def export_module(model: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export an eval-mode module on an example batch of two (fixes the batch axis unambiguously)."""
    model = model.eval()
    x = example[:1].expand(2, *example.shape[1:]).clone() if example.shape[0] != 2 else example
    try:
        return torch.export.export(model, (x,), strict=False)
    except Exception as e:  # torch.export's own errors name the construct that failed
        raise UserError(f"torch.export could not capture the model: {str(e).splitlines()[0]}") from e


def capture(model, example: torch.Tensor | None = None) -> Graph:
    """Build the IR graph from an ExportedProgram, or from a module and an example input."""
    if isinstance(model, ExportedProgram):
        ep = model
    else:
        if example is None:
            raise UserError("capturing an nn.Module needs an example input")
        ep = export_module(model, example)
    graph = _Builder(ep).build()
    return graph
