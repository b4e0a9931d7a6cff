"""The reference interpreter: runs a converted :class:`~sfn_deploy.ir.Graph` in PyTorch, node by node.

One loop serves every way the graph is executed; each is a subclass that overrides hooks, as
``torch.fx.Interpreter`` subclasses do:

- :class:`Interpreter`: ``run(x)`` walks the nodes in order, ``run_node`` computes one (input,
  constant, a registered neuron kind, a neuron through ``fire``, anything else through ``call_op``,
  the op table's :func:`sfn_deploy.ops.apply`), then hands an :class:`Event` to the observer and
  drops the values nobody reads any more (:func:`release_plan`).
- :class:`AnnInterpreter`: every neuron is the identity (or the ReLU it absorbed): the source model.
- :class:`SnnInterpreter`: the single-timestep SNN; neurons fire by the rule of
  :mod:`sfn_deploy.neurons` (constant time through :mod:`sfn_deploy.simulators.firegrid`), and
  nodes of a registered neuron kind (:func:`register_neuron_kind`: ``--method mbe``) run its function.
- :class:`TemporalInterpreter`: graphs with stateful neurons over T steps, by the plan of
  :mod:`sfn_deploy.simulators.temporal`; the output is the mean over the steps.
- ``pmsm.forward`` subclasses :class:`Interpreter` with a differentiable fake-quantiser as ``fire``.

Observers (calibration, the op counter, parity, :func:`run_with_levels`) are called once per node
evaluation with an :class:`Event`. :func:`run` also accepts the older hook form
``hook(node, args, out, extra)``, whose ``extra`` dict is :meth:`Event.extra`.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from sfn_deploy import devices
from sfn_deploy.errors import UserError
from sfn_deploy.ir import NEURON_OPS, OPS, STATEFUL_OPS, Graph, Node
from sfn_deploy.neurons import NODE_CACHE, signed_table
from sfn_deploy.ops import IN_PLACE, INTO, apply, apply_form

from .firegrid import fire_with
from .temporal import gate, temporal_plan


@dataclass(slots=True, eq=False)
class Event:
    """One evaluation of one node, as an observer sees it.

    position/hist: a neuron's int32 positions (signed index + N) and their histogram, when computed;
    t/T: the step of a multi-timestep run (None for single-step runs and for ``static`` nodes, which
    are evaluated once per inference); ecm: computed by the expectation compensation; mbe/counts: an
    MBE neuron's totals and per-element spike tensors (``sfn_deploy.mbe.apply``)."""
    node: Node
    args: list
    out: torch.Tensor | None = None
    position: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    t: int | None = None
    T: int | None = None
    static: bool = False
    ecm: bool = False
    mbe: dict | None = None
    counts: tuple | None = None

    def extra(self) -> dict:
        """The fields that are set, as the dict the older ``hook(node, args, out, extra)`` form received."""
        d: dict[str, Any] = {}
        if self.static:
            d["static"] = True
        if self.t is not None:
            d["t"], d["T"] = self.t, self.T
        if self.position is not None:
            d["position"] = self.position
        if self.hist is not None:
            d["hist"] = self.hist
        if self.ecm:
            d["ecm"] = True
        if self.mbe is not None:
            d["mbe"] = self.mbe
        if self.counts is not None:
            d["counts"] = self.counts
        return d


class Observer:
    """Called with every :class:`Event`. ``wants_hist``: single-step runs hand each site's histogram of
    positions (``event.hist``); ``skip_positions``: names of sites whose positions it never reads (no
    ``event.position`` there, which saves writing them); ``reads_private_inputs``: whether it reads the inputs
    (``event.args``) of neurons and of ops with an in-place form (``ops.IN_PLACE``) — when not, such a node may
    write its output over an input nothing else reads (:func:`private_inputs`), except the values named in
    ``kept``, which it does read."""
    wants_hist: bool = False
    skip_positions: Any = ()
    reads_private_inputs: bool = True
    kept: frozenset[str] = frozenset()

    def __call__(self, event: Event) -> None:
        raise NotImplementedError


class _HookObserver(Observer):
    """The older hook form, ``hook(node, args, out, extra)``, with its wants_hist/skip_positions."""

    def __init__(self, hook: Callable):
        self.hook = hook
        self.wants_hist = bool(getattr(hook, "wants_hist", False))
        self.skip_positions = getattr(hook, "skip_positions", None) or ()

    def __call__(self, event: Event) -> None:
        self.hook(event.node, event.args, event.out, event.extra())


def as_observer(hook) -> Observer | None:
    """An :class:`Observer` as is; a plain ``hook(node, args, out, extra)`` wrapped; None stays None."""
    if hook is None or isinstance(hook, Observer):
        return hook
    return _HookObserver(hook)


# ---------------------------------------------------------------- neuron kinds

@dataclass
class NeuronKind:
    """Nodes that ``matches`` selects run ``spike(node, args) -> (out, stats)`` in the spiking modes;
    stats keys are :class:`Event` fields (``mbe``, ``counts``). ``spike`` may be given as
    ``"module:function"``, imported on first use, so that a conversion method above the simulators
    (``sfn_deploy.mbe``, which runs this interpreter itself) provides it without an import cycle."""
    name: str
    matches: Callable[[Node], bool]
    spike: Any

    def function(self) -> Callable:
        if isinstance(self.spike, str):
            module, attr = self.spike.split(":")
            self.spike = getattr(importlib.import_module(module), attr)
        return self.spike


NEURON_KINDS: list[NeuronKind] = []


def register_neuron_kind(name: str, matches: Callable[[Node], bool], spike) -> NeuronKind:
    """Add a neuron kind that the spiking interpreters check before the SFN rule."""
    kind = NeuronKind(name, matches, spike)
    NEURON_KINDS[:] = [k for k in NEURON_KINDS if k.name != name] + [kind]
    return kind


# --method mbe: ``mbe_neuron`` nodes, and gelu/softmax/layer_norm nodes with attrs["mbe_fn"], run their spiking
# MBE form (T internal steps per neuron, one pass of the graph); the ANN ignores the attrs.
register_neuron_kind("mbe", lambda node: node.op == "mbe_neuron" or "mbe_fn" in node.attrs, "sfn_deploy.mbe:apply")


# ---------------------------------------------------------------- the interpreters

def release_plan(graph: Graph) -> dict[str, list[str]]:
    """For each node, the values whose last reader it is (the output is kept)."""
    last: dict[str, str] = {}
    for n in graph.nodes:
        for i in n.inputs:
            last[i] = n.name
    plan: dict[str, list[str]] = {}
    for value, reader in last.items():
        if value != graph.output:
            plan.setdefault(reader, []).append(value)
    return plan


def _absorbed(node: Node, x: torch.Tensor) -> torch.Tensor:
    """A neuron in the ANN: the identity, or the ReLU it absorbed."""
    return torch.relu(x) if node.attrs.get("absorbs") == "relu" else x


class Interpreter:
    """Runs a graph on one batch (batch axis first); subclasses override the hooks below."""

    kinds: list[NeuronKind] = []       # neuron kinds checked before ``fire`` (the spiking modes: NEURON_KINDS)

    def __init__(self, graph: Graph, observer: Observer | None = None):
        self.graph = graph
        self.observer = observer
        self.wants_hist = bool(getattr(observer, "wants_hist", False))
        self.skip_positions = getattr(observer, "skip_positions", None) or ()
        self.overwrite_inputs = observer is None or not getattr(observer, "reads_private_inputs", True)
        self.kept = frozenset(getattr(observer, "kept", ()))
        self.private: dict[str, int] = {}     # node → the input it may write over (the single-step runs)
        self.x = torch.empty(0)        # the batch of the current run
        self.batch = 0
        self.buffers = Buffers()       # released values' storage, handed out again within this run

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The graph's output on the batch ``x``."""
        self.x, self.batch = x, x.shape[0]
        env: dict[str, torch.Tensor] = {}
        free = release_plan(self.graph)
        observer = self.observer
        for node in self.graph.nodes:
            args = [env[i] for i in node.inputs]
            event = Event(node, args)
            event.out = out = self.run_node(node, args, event)
            env[node.name] = out
            if observer is not None:
                observer(event)
            del args, event, out                     # (so that a released value's only reference is env's)
            for name in free.get(node.name, ()):     # bounded memory: drop values nobody reads any more
                self.buffers.give(env.pop(name))
        return env[self.graph.output]

    def run_node(self, node: Node, args: list, event: Event) -> torch.Tensor:
        op = node.op
        if op == "input":
            return self.x
        if op == "constant":
            return node.params["value"]
        for kind in self.kinds:
            if kind.matches(node):
                return self.call_kind(kind, node, args, event)
        if OPS[op][0] == "neuron":
            return self.fire(node, args, event)
        return self.call_op(node, args)

    def call_op(self, node: Node, args: list) -> torch.Tensor:
        """A non-neuron op, by the op table; over its input where that is private (:func:`private_inputs`)."""
        if not _reusing(args):
            return apply(node, args, self.graph, self.batch)
        i = self.private.get(node.name)
        if i is not None and _overwritable(args[i]):
            out = apply_form(IN_PLACE, node, args, i)
            if out is not None:
                return out
        out = apply_form(INTO, node, args, self.buffers.take)
        if out is not None:
            return out
        return apply(node, args, self.graph, self.batch)

    def call_kind(self, kind: NeuronKind, node: Node, args: list, event: Event) -> torch.Tensor:
        """A node of a registered neuron kind: its function's output, its stats onto the event."""
        out, stats = kind.function()(node, args)
        for key, value in stats.items():
            setattr(event, key, value)
        return out

    def fire(self, node: Node, args: list, event: Event) -> torch.Tensor:
        """A neuron node (op kind "neuron"): its output; positions/histogram onto the event."""
        raise NotImplementedError(f"{type(self).__name__} has no rule for neuron {node.name} ({node.op})")


class AnnInterpreter(Interpreter):
    """The ANN: every neuron is the identity or the ReLU it absorbed, and every weight layer has the source
    model's bias (``bias_ann`` where bias correction gave the SNN another), so the result is the source model's."""

    def __init__(self, graph: Graph, observer: Observer | None = None):
        super().__init__(graph, observer)
        self.private = private_inputs(graph, sites=False, kept=self.kept) if self.overwrite_inputs else {}

    def fire(self, node: Node, args: list, event: Event) -> torch.Tensor:
        return _absorbed(node, args[0])

    def call_op(self, node: Node, args: list) -> torch.Tensor:
        if "bias_ann" in node.params:
            return apply(ann_view(node), args, self.graph, self.batch)
        return super().call_op(node, args)


def ann_view(node: Node) -> Node:
    """A weight layer as the source model had it: ``bias_ann`` as its bias (cached per node)."""
    p = node.params
    return NODE_CACHE.get(node, "ann_view", (p["bias_ann"], p["weight"]),
                          lambda: replace(node, params={**p, "bias": p["bias_ann"]}))


_FRESH_KINDS = ("weight", "product", "host", "pool")     # ops that compute a new tensor (layout ops may alias)


def private_inputs(graph: Graph, sites: bool = True, kept: frozenset[str] = frozenset()) -> dict[str, int]:
    """Node → the first of its inputs it may write its output over: a value nothing else reads (not one of
    ``kept``), computed by a producer that makes a new tensor; for neuron sites (``sites``) and ops with an
    in-place form (``ops.IN_PLACE``, which may still decline that input). A fresh allocation fewer, and for a
    site one 4-byte stream per element fewer."""
    users = graph.users()
    site_names = {s.name for s in graph.sites} if sites else set()

    def private(value: str) -> bool:
        return (len(users[value]) == 1 and value != graph.output and value not in kept
                and graph[value].kind in _FRESH_KINDS and graph[value].op != "pad")
    out: dict[str, int] = {}
    for n in graph.nodes:
        if n.name in site_names or n.op in IN_PLACE:
            k = next((k for k, v in enumerate(n.inputs) if private(v)), None)
            if k is not None:
                out[n.name] = k
    return out


def _reusing(args: list) -> bool:
    """Whether a node on these inputs may use the in-place and into forms and the released buffers: on the CPU,
    where every fresh activation costs page faults (a GPU's caching allocator reuses its memory itself), and
    without autograd (a method trained through the graph)."""
    return not torch.is_grad_enabled() and all(isinstance(a, torch.Tensor) and a.device.type == "cpu"
                                               for a in args)


def _mebibytes(name: str) -> int:
    raw = os.environ[name]
    if not raw.strip().isdigit():
        raise UserError(f"{name}={raw!r}: give a whole number of MiB (0: none)")
    return int(raw) << 20


class Buffers:
    """The storage of values a run released, handed out again (``ops.into`` forms, a neuron's output): under the
    CLI's 1 MiB mmap threshold (``sfn_deploy.allocator``) each fresh activation is a new mapping whose page faults
    cost about as much as the op that fills it. A released value's storage joins only when nothing else can reach
    it (no other Python reference, no other tensor on it) and it is a dense float32 CPU tensor of at least
    ``MIN_BYTES``; a request gets the smallest kept storage that holds it and is at most twice its size (best
    fit: the pool holds few buffers at a time). At most ``LIMIT`` bytes are kept, or ``SFN_BUFFER_POOL_MB``
    MiB (a smaller machine trades speed for memory; 0: no pool); the pool lives for one run (one batch)."""

    MIN_BYTES = 1 << 20
    LIMIT = 256 << 20
    ENV = "SFN_BUFFER_POOL_MB"

    def __init__(self):
        self.free: list[torch.UntypedStorage] = []
        self.held = 0
        self.reused = 0
        self.limit = self.LIMIT if os.environ.get(self.ENV, "") == "" else _mebibytes(self.ENV)

    def take(self, shape) -> torch.Tensor:
        """A dense float32 tensor of ``shape``: on a released storage, else a new one."""
        shape = tuple(shape)
        need = math.prod(shape) * 4
        fits = [(size, k) for k, size in enumerate(s.nbytes() for s in self.free) if need <= size <= 2 * need]
        if not fits:
            return torch.empty(shape, dtype=torch.float32)
        size, k = min(fits)
        self.held -= size
        self.reused += 1
        return torch.empty(0, dtype=torch.float32).set_(self.free.pop(k), 0, shape)  # type: ignore[call-overload]

    def give(self, t) -> None:
        """Keep ``t``'s storage (``t`` passed with its holder's last reference: ``env.pop(name)``) if it is the
        pool's to reuse."""
        size = t.untyped_storage().nbytes() if type(t) is torch.Tensor else 0
        if size < self.MIN_BYTES or self.held + size > self.limit or sys.getrefcount(t) > _ALONE[0] \
                or t.dtype != torch.float32 or t.device.type != "cpu" or t._base is not None \
                or not t.is_contiguous() or t.requires_grad or t.storage_offset() != 0 \
                or _storage_users(t) != _ALONE[1]:
            return
        self.free.append(t.untyped_storage())
        self.held += size

    @staticmethod
    def _refs(t) -> int:          # the references ``give`` sees on a value nothing else holds
        return sys.getrefcount(t)


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors share t's storage (torch's count, plus the probe's own), or -1 where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return -1 if count is None else count(t.untyped_storage()._cdata)


_ALONE = (Buffers._refs({"t": torch.empty(1)}.pop("t")), _storage_users(torch.empty(1)))


def _overwritable(x: torch.Tensor) -> bool:
    """A value an op may write its output over: its own storage (not a view), dense, float32, no autograd."""
    return x._base is None and x.is_contiguous() and not x.requires_grad and x.dtype == torch.float32


class SnnInterpreter(Interpreter):
    """The single-timestep SNN."""

    kinds = NEURON_KINDS

    def __init__(self, graph: Graph, observer: Observer | None = None):
        super().__init__(graph, observer)
        self.private = private_inputs(graph, kept=self.kept) if self.overwrite_inputs else {}

    def fire(self, node: Node, args: list, event: Event) -> torch.Tensor:
        if node.op not in NEURON_OPS:
            raise NotImplementedError(f"no neuron kind is registered for node {node.name} ({node.op})")
        position = node.name not in self.skip_positions
        x = args[0]
        if self.private.get(node.name) == 0 and _overwritable(x):
            into: torch.Tensor | None = x
        elif _reusing(args) and x.dtype == torch.float32 and x.numel() * 4 >= Buffers.MIN_BYTES:
            into = self.buffers.take(x.shape)
        else:
            into = None
        out, event.position, event.hist = fire_with(node, x, self.wants_hist, position, out=into)
        return out


class TemporalInterpreter(Interpreter):
    """T synchronous steps on the same input (direct coding); the output is the mean over the steps.

    Each node behaves by :func:`~sfn_deploy.simulators.temporal.temporal_plan`: static nodes are computed
    once (their event has ``static``), the others every step (``t``, ``T``); observers always get positions."""

    def __init__(self, graph: Graph, observer: Observer | None = None, timesteps: int | None = None):
        super().__init__(graph, observer)
        self.T = int(timesteps or graph.timesteps)
        if self.T < 1:
            raise ValueError(f"timesteps must be ≥ 1, got {self.T}")
        self.plan = temporal_plan(graph)
        self.wants_hist, self.skip_positions = False, ()
        self.state: dict[str, Any] = {}
        self.t = 0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.x, self.batch = x, x.shape[0]
        graph, plan, T, observer = self.graph, self.plan, self.T, self.observer
        free = release_plan(graph)
        static: dict[str, torch.Tensor] = {}
        self.state = {}
        total = torch.zeros(())
        for t in range(T):
            self.t = t
            env: dict[str, torch.Tensor] = dict(static)
            for node in graph.nodes:
                how = plan[node.name]
                if how == "static" and t > 0:
                    continue
                args = [env[i] for i in node.inputs]
                event = Event(node, args, static=True) if how == "static" else Event(node, args, t=t, T=T)
                event.out = out = self.run_node(node, args, event)
                env[node.name] = out
                if how == "static":
                    static[node.name] = out
                if observer is not None:
                    observer(event)
                for name in free.get(node.name, ()):
                    if name in env and name not in static:
                        del env[name]
            y = env[graph.output]
            total = y.clone() if t == 0 else total + y
        return total / T

    def run_node(self, node: Node, args: list, event: Event) -> torch.Tensor:
        if node.op == "input":
            return self.x
        if node.op == "constant":
            return node.params["value"]
        how, state, t = self.plan[node.name], self.state, self.t
        if how == "state":          # m = v + x(t); fire; v = m − o (soft reset); v(0) = v0·step⁺
            v = state.get(node.name)
            if v is None:
                v0 = float(node.attrs.get("v0", 0.0)) * float(node.params["steps"][0])
                v = torch.full_like(args[0], v0)
            m = v + args[0]
            out = self.fire(node, [m], event)
            state[node.name] = m - out
            return out
        if how == "gate":
            count = state.get(node.name)
            count = args[0].clone() if count is None else count + args[0]
            state[node.name] = count
            return gate(node, args[0], count)
        if how == "ecm":            # O(t) = t·f(S(t)/t) − (t−1)·f(S(t−1)/(t−1)), S the running input sums
            varying = [self.plan[i] != "static" for i in node.inputs]
            sums, prev = state.get(node.name, (None, None))
            sums = [a.clone() if v else a for v, a in zip(varying, args, strict=True)] if sums is None \
                else [s + a if v else s for v, s, a in zip(varying, sums, args, strict=True)]
            means = [s / (t + 1) if v else s for v, s in zip(varying, sums, strict=True)]
            cum = (t + 1) * self.step(node, means, None)
            state[node.name] = (sums, cum)
            event.ecm = True
            return cum if prev is None else cum - prev
        return self.step(node, args, event)

    def step(self, node: Node, args: list, event: Event | None) -> torch.Tensor:
        """A stateless node at one step: an ``sfn`` fires (positions onto the event, if any), others by the op table."""
        if node.op == "sfn":
            return self.fire(node, args, event)
        if node.op in STATEFUL_OPS:      # ECM never wraps a neuron; kept for completeness
            raise ValueError(f"node {node.name}: a stateful neuron cannot be applied statelessly")
        return self.call_op(node, args)

    def fire(self, node: Node, args: list, event: Event | None) -> torch.Tensor:
        out, position, _ = fire_with(node, args[0])
        if event is not None:
            event.position = position
        return out


@torch.no_grad()
def run(graph: Graph, x: torch.Tensor, *, spiking: bool = True, hook=None) -> torch.Tensor:
    """Execute the graph on a batch ``x`` (batch axis first) and return the output tensor: the ANN
    (``spiking=False``), the single-timestep SNN, or, for a graph with stateful neurons, the mean SNN
    output over its T steps. ``hook``: an :class:`Observer`, or a ``hook(node, args, out, extra)``."""
    observer = as_observer(hook)
    device = devices.current()
    if device.type != "cpu":        # computed on the device's mirror of the graph, handed back on the CPU
        if spiking and (graph.stateful or any(k.matches(n) for n in graph.nodes for k in NEURON_KINDS)):
            if devices.named():
                raise UserError(f"--device {device}: the GPU path runs single-step SFN graphs; this one "
                                f"(method {graph.method}) runs on the CPU (--device cpu)")
            return run_on(graph, x, spiking, observer)          # --device auto: where it runs
        return run_on(devices.mirror(graph, device), x.to(device, non_blocking=True), spiking, observer).cpu()
    return run_on(graph, x, spiking, observer)


def run_on(graph: Graph, x: torch.Tensor, spiking: bool, observer: Observer | None) -> torch.Tensor:
    """:func:`run` where graph and batch already are (the ANN, the single-step SNN, or T steps)."""
    if not spiking:
        return AnnInterpreter(graph, observer).run(x)
    if graph.stateful:
        return TemporalInterpreter(graph, observer).run(x)
    return SnnInterpreter(graph, observer).run(x)


class _Levels(Observer):
    reads_private_inputs = False

    def __init__(self):
        self.levels: dict[str, torch.Tensor] = {}

    def __call__(self, event: Event) -> None:
        pos = event.position
        if pos is not None:
            self.levels[event.node.name] = torch.index_select(signed_table(event.node), 0,
                                                              pos.reshape(-1)).view(pos.shape)


def run_with_levels(graph: Graph, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SNN's output and the signed integer spike level of every neuron site, for checking backends."""
    keep = _Levels()
    out = run(graph, x, hook=keep)
    return out, {name: v.cpu() for name, v in keep.levels.items()}
