"""The capture loop and the rule registry: each ATen operator is handled by one small rule.

A rule is a function ``rule(b, n) -> Node | None`` registered for one or more ATen
overloads with :func:`rule`. It reads the fx node ``n`` (targets, args, kwargs, the
example value in ``n.meta["val"]``) and returns the IR node that now stands for its
value (a new node made with ``b.emit``, or an existing one for a pass-through), or
None when the operator carries no data (shape queries, asserts). A rule that cannot
map its operator raises :class:`Unsupported` with the reason; the builder collects
every such problem and reports them all at once.

Operators whose tensor inputs are all stored tensors (parameters, buffers, constants,
or values folded from them) are evaluated once here and become constants, so tables
that a model computes from its own parameters (relative position biases, masks)
need no rule of their own.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import cast

import torch
from torch.export import ExportedProgram

from ..errors import UnsupportedOpsError, UserError
from ..ir import Graph, Node, nonfinite

Rule = Callable[["Builder", torch.fx.Node], "Node | None"]
RULES: dict[object, Rule] = {}

aten = torch.ops.aten
# tensors whose value depends on their input's shape and type only (the fill value of new_full/full_like is arg 2/1)
_SHAPE_ONLY = {aten.new_zeros.default: 0.0, aten.zeros_like.default: 0.0, aten.new_empty.default: 0.0,
               aten.empty_like.default: 0.0, aten.new_ones.default: 1.0, aten.ones_like.default: 1.0,
               aten.new_full.default: 2, aten.full_like.default: 1}
# ops that may turn a stored tensor into a batch-sized one: folded only when no new axis has the example's batch
_BROADCASTS = {torch.ops.aten.expand.default, torch.ops.aten.repeat.default, torch.ops.aten.expand_as.default}


def rule(*targets) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the rule for each ATen overload in ``targets`` (one rule per operator)."""
    def register(fn: Rule) -> Rule:
        for t in targets:
            if t in RULES:
                raise RuntimeError(f"two capture rules for {t}: {RULES[t].__name__} and {fn.__name__}")
            RULES[t] = fn
        return fn
    return register


class Unsupported(Exception):
    """Raised by a rule: this operator (or this use of it) has no conversion; the message says why."""


def prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


def concrete(s) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise UserError(f"symbolic size {s} has no example value; export with a concrete example input")
        return int(hint)
    return int(s)


def meta_shape(fx_node, item: int | None = None) -> list[int] | None:
    """The example shape of an fx node's value (of its ``item``-th output for a tuple)."""
    val = fx_node.meta.get("val")
    if item is not None and isinstance(val, (list, tuple)):
        val = val[item]
    if isinstance(val, torch.Tensor):
        return [concrete(s) for s in val.shape]
    return None


def sym_entries(fx_node) -> list[bool]:
    """Which entries of the node's shape are symbolic (a dynamic batch)."""
    val = fx_node.meta.get("val")
    return [isinstance(s, torch.SymInt) and not isinstance(s.node.maybe_as_int(), int) for s in val.shape]


def pair(v) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [int(v[0]), int(v[-1])] if len(v) else [0, 0]
    return [int(v), int(v)]


def arg(n: torch.fx.Node, i: int, name: str, default=None):
    """Argument ``i`` of an fx call, given positionally or by keyword."""
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def where(fx_node) -> str:
    """Module path and source line of an fx node, for messages."""
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


def _rank_aligned_bdim(ins: list[Node], out_rank: int) -> int | None:
    for i in ins:
        if i.bdim is not None:
            return i.bdim + (out_rank - len(i.shape))
    return None


class Builder:
    """State of one capture: the IR nodes made so far and what each fx node maps to."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        sig = ep.graph_signature
        self.state: dict[str, torch.Tensor] = {}   # placeholder or folded fx node -> stored tensor
        self.origin: dict[str, str] = {}           # placeholder -> "parameter 'fc1.weight'" (for messages)
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
        self.batch = 0
        self.tuples: dict[str, list[Node]] = {}   # fx node with several outputs -> one IR node per output
        self.per_batch: set[str] = set()   # folded tensors made with the example's batch size as their first axis
        self.outer: dict[str, int] = {}     # node -> items outside the batch within its batch axis (see batch_reshape)

    # -- what rules use --------------------------------------------------------
    def add(self, node: Node) -> Node:
        base, k = node.name, 1
        while node.name in self.index:
            k += 1
            node.name = f"{base}_{k}"
        self.nodes.append(node)
        self.index[node.name] = node
        return node

    def ir(self, a) -> Node:
        """The IR node holding the value of fx argument ``a`` (a stored tensor becomes a constant node)."""
        if isinstance(a, torch.fx.Node):
            if a.name in self.env:
                return self.index[self.env[a.name]]
            if a.name in self.state:      # a parameter used as data
                t = self.stored(a.name)
                if a.name in self.per_batch and self._same_samples(t):
                    return self._per_batch(a.name, t)
                node = self.add(Node(a.name, "constant", [], {}, {"value": t}, list(t.shape), None, a.name))
                self.env[a.name] = node.name
                return node
        raise Unsupported(f"argument {a!r} is not a tensor the converter can follow")

    def param(self, a) -> torch.Tensor | None:
        """A stored tensor read as a weight (None stays None)."""
        if a is None:
            return None
        if isinstance(a, torch.fx.Node) and a.name in self.state:
            return self.stored(a.name)
        raise Unsupported("weights must be stored parameters, not computed tensors")

    def stored(self, ph: str) -> torch.Tensor:
        """A stored tensor the graph reads (parameter, buffer or constant), refused when it holds NaN/Inf:
        the converted network would compute NaN silently (and a saved model holding one does not load)."""
        t = self.state[ph]
        if ph not in self.checked:
            bad = nonfinite(t) if t.is_floating_point() else 0
            if bad:
                raise UserError(f"{self.origin.get(ph, repr(ph))} holds NaN/Inf values ({bad} of {t.numel()})")
            self.checked.add(ph)
        return t

    def _same_samples(self, t: torch.Tensor) -> bool:
        return t.dim() > 0 and t.shape[0] == self.batch and all(torch.equal(t[0], t[i]) for i in range(1, len(t)))

    def _per_batch(self, name: str, t: torch.Tensor) -> Node:
        """A folded tensor built from the example's batch size (``torch.zeros(B, H, W)`` in a position encoding)
        whose samples are all the same: one sample, broadcast over the batch. (Samples that differ: a table whose
        first axis merely equals the example's batch, kept as it is.)"""
        one = self.add(Node(name + "_sample", "constant", [], {}, {"value": t[:1].clone()}, [1, *t.shape[1:]], None,
                            name))
        node = self.add(Node(name, "expand", [one.name], {"shape": ["B"] + [-1] * (t.dim() - 1)}, {},
                             [self.batch, *t.shape[1:]], 0, name))
        self.env[name] = node.name
        return node

    def is_param(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and a.name in self.state and a.name not in self.env

    def emit(self, fx_node, op, inputs, attrs=None, params=None, shape=None, bdim="same", name=None,
             outer: int | None = None) -> Node:
        """Add an IR node for ``fx_node``; ``bdim="same"`` aligns the batch axis with the first batched input.
        ``outer``: items outside the batch within its axis (a reshape's); other ops keep their input's."""
        ins = [i if isinstance(i, Node) else self.ir(i) for i in inputs]
        if bdim == "same":
            bdim = _rank_aligned_bdim(ins, len(shape) if shape is not None else len(ins[0].shape))
        node = self.add(Node(name or fx_node.name, op, [i.name for i in ins], attrs or {}, params or {},
                             list(shape) if shape is not None else list(ins[0].shape), bdim, where(fx_node)))
        if outer is None and bdim is not None:
            outer = next((self.outer[i.name] for i in ins if i.bdim is not None and i.name in self.outer), 1)
        if outer is not None and outer > 1:
            self.outer[node.name] = outer
        return node

    # -- the loop --------------------------------------------------------------
    def build(self) -> Graph:
        gm = self.ep.graph_module
        fx_graph = _inline_float32_regions(gm)
        user_inputs = [s.arg.name for s in self.ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        if len(user_inputs) != 1:
            raise UserError(f"the model must take exactly one tensor input, it takes {len(user_inputs)}")
        out_node = None
        for fx_node in fx_graph.nodes:
            if fx_node.op == "placeholder":
                if fx_node.name == user_inputs[0]:
                    shape = meta_shape(fx_node)
                    if shape is None or not shape:
                        raise UserError("the model's input must be a tensor with a batch axis")
                    self.batch = shape[0]
                    self.env[fx_node.name] = self.add(Node("input", "input", [], {}, {}, shape, 0, "input")).name
                continue
            if fx_node.op == "output":
                outs = fx_node.args[0]
                out_node = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                continue
            if fx_node.op == "get_attr":         # a submodule a higher-order call reads: that call is checked
                continue
            if fx_node.op != "call_function":
                self.problems.append(f"{fx_node.op} {fx_node.target} at {where(fx_node)}")
                continue
            self._visit(fx_node)
        if self.problems:
            raise UnsupportedOpsError(self.problems)
        if out_node is None or not out_node:
            raise UserError("the model returns no tensor")
        parts = None
        if len(out_node) == 1:
            out = self.ir(out_node[0])
        else:
            out, parts = self._join(out_node)
        graph = Graph(self.nodes, out.name, output_parts=parts)
        for n in graph.nodes:                     # per-sample shapes from here on ("B*k" axes hold k)
            if n.bdim is not None and n.shape:
                n.shape[n.bdim] = max(1, n.shape[n.bdim] // self.batch)
        return prune(graph)

    def _join(self, outs: list) -> tuple[Node, list[list[int]]]:
        """Several returned tensors (timm ``features_only``: one map per stage) become one output, each flattened
        per sample and concatenated in order; their per-sample shapes are recorded to split it again."""
        flat, parts = [], []
        for i, o in enumerate(outs):
            x = self.ir(o)
            if x.bdim != 0 or len(x.shape) < 2:
                raise UserError(f"the model's output {i} (shape {x.shape}) has no leading batch axis; several "
                                "outputs are joined per sample")
            width = prod(x.shape[1:])
            flat.append(self.add(Node(f"output_{i}_flat", "flatten", [x.name], {"start": 1, "end": len(x.shape) - 1},
                                      {}, [x.shape[0], width], 0, "output")))
            parts.append([concrete(v) for v in x.shape[1:]])
        total = sum(f.shape[1] for f in flat)
        joined = self.add(Node("outputs", "cat", [f.name for f in flat], {"dim": 1}, {}, [flat[0].shape[0], total], 0,
                               "output"))
        return joined, parts

    def _visit(self, fx_node) -> None:
        try:
            if self._fold(fx_node):
                return
            fn = RULES.get(fx_node.target)
            if fn is None:
                raise Unsupported("no conversion rule for this operator")
            out = fn(self, fx_node)
            if out is not None:
                self.env[fx_node.name] = out.name
        except Unsupported as e:
            self.problems.append(f"{fx_node.target} at {where(fx_node)}: {e}")
            shape = meta_shape(fx_node)
            if shape is not None:   # a stand-in, so later nodes are still checked for their own problems
                self.env[fx_node.name] = self.add(Node(fx_node.name, "constant", [], {}, {}, shape, 0)).name

    def _fold(self, fx_node) -> bool:
        """Evaluate an operator computed from stored tensors only (or from no tensor at all: ``arange``, ``zeros``
        of fixed sizes, as in sine position encodings), once, as a constant. Not folded: random operators, and
        outputs with a symbolic (batch) size or, from a broadcast, an axis of the example's batch size."""
        ins = list(fx_node.all_input_nodes)
        target = fx_node.target
        if target in _SHAPE_ONLY:
            return self._fold_shape_only(fx_node)
        if not isinstance(target, torch._ops.OpOverload) or not all(i.name in self.state for i in ins):
            return False
        inference_dropout = "dropout" in target.name() and arg(fx_node, 2, "train", True) is False
        if torch.Tag.nondeterministic_seeded in target.tags and not inference_dropout:     # random operators
            return False
        if any(sym_entries(fx_node)) if isinstance(fx_node.meta.get("val"), torch.Tensor) else True:
            return False
        if target in _BROADCASTS and self._batch_axis_made(fx_node):
            return False

        def value(a):
            return self.stored(a.name) if isinstance(a, torch.fx.Node) else a
        args = torch.fx.node.map_aggregate(fx_node.args, value)
        kwargs = torch.fx.node.map_aggregate(fx_node.kwargs, value)
        with torch.no_grad():
            out = fx_node.target(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return False
        self.state[fx_node.name] = out.detach()
        self.origin[fx_node.name] = f"a tensor computed from stored tensors ({fx_node.target})"
        if any(i.name in self.per_batch for i in ins) or (not ins and self.batch > 1 and out.dim() and
                                                          out.shape[0] == self.batch):
            self.per_batch.add(fx_node.name)
        return True

    def _fold_shape_only(self, fx_node) -> bool:
        """``x.new_zeros(size)``, ``zeros_like(x)``, …: a constant of the example's shape (Swin's attention mask
        is built on one); one made with the example's batch as its first axis is broadcast over the batch."""
        val, fill = fx_node.meta.get("val"), _SHAPE_ONLY[fx_node.target]
        if not isinstance(val, torch.Tensor) or any(sym_entries(fx_node)):
            return False
        value = float(fx_node.args[fill]) if isinstance(fill, int) else fill
        self.state[fx_node.name] = torch.full([concrete(v) for v in val.shape], value, dtype=val.dtype)
        self.origin[fx_node.name] = f"a tensor of the example's shape ({fx_node.target})"
        if self.batch > 1 and val.dim() and concrete(val.shape[0]) == self.batch:
            self.per_batch.add(fx_node.name)
        return True

    def _batch_axis_made(self, fx_node) -> bool:
        """A broadcast gives some axis the example's batch size that its input did not have (with a static
        export the batch is a plain number: folding would fix it)."""
        out = meta_shape(fx_node) or []
        src = meta_shape(fx_node.args[0]) or []
        off = len(out) - len(src)
        return self.batch > 1 and any(s == self.batch and (i < off or src[i - off] != s) for i, s in enumerate(out))


def _inline_float32_regions(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    """The program's graph, with each ``torch.autocast(enabled=False)`` region (EfficientViT's linear attention
    forces float32 that way; torch.export wraps it in a ``wrap_with_autocast`` call of a submodule) copied inline:
    the converted network computes in float32 anyway. A copy: the user's program is left as it was. Enabled
    regions (mixed precision) stay, and are reported as unsupported."""
    hop = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    calls = [n for n in gm.graph.nodes if hop is not None and n.target is hop and not n.args[2]]
    if not calls:
        return gm.graph
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for call in calls:
        node = copies[call]
        sub, operands = cast(torch.fx.Node, node.args[4]), cast(tuple, node.args[5:])
        body = cast(torch.fx.GraphModule, gm.get_submodule(str(sub.target))).graph
        inputs = [p for p in body.nodes if p.op == "placeholder"]
        with graph.inserting_before(node):
            out = graph.graph_copy(body, dict(zip(inputs, operands, strict=True)))
        out = out if isinstance(out, (tuple, list)) else (out,)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise UserError(f"an autocast region's result is read by {user.target}, not by picking an output")
            user.replace_all_uses_with(out[cast(int, user.args[1])])
            graph.erase_node(user)
        graph.erase_node(node)
        if not sub.users:
            graph.erase_node(sub)
    return graph


def prune(graph: Graph) -> Graph:
    """Drop nodes the output does not depend on (shape computations, unused constants)."""
    live = {graph.output}
    for n in reversed(graph.nodes):
        if n.name in live:
            live.update(n.inputs)
    graph.nodes = [n for n in graph.nodes if n.name in live or n.op == "input"]
    graph.reindex()
    return graph
