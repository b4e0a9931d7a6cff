"""Exact operation counts of a converted network on real data (SPEC §5).

Conventions (the paper's, eq. 43–44):
- ANN: a weight layer costs one MAC per multiply-accumulate (conv: C_in/groups·k_h·k_w per
  output element, linear: in_features per output element); an activation product A·B costs
  K per output element (attention q·kᵀ and attn·v included).
- SNN: a weight layer whose input is a spike tensor costs |y|·F additions (ACs) for each input
  element at level y with fan-out F; with analog input (the first layer) it costs the same MACs
  as the ANN. In a product of two spike tensors A·B, A's spikes are the events and B plays the
  (dynamic) weights: |y_A|·N ACs per element of A (N columns of B).
- Pooling of spikes before a weight layer is folded into that layer: the spikes keep their
  own fan-out (sum pooling of |y|), so pooling adds no ACs.
- Host operations (LayerNorm, softmax, GELU, residual arithmetic) are counted per output
  element and named; they are outside the paper's ratio and listed for auditing.
All counts are per inference (per sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from sfn_deploy.ir import Graph, Node
from sfn_deploy.runtime import _op, _release_plan, run

_FOLLOW = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice", "expand"}


@dataclass
class LayerCount:
    name: str
    op: str
    kind: str
    source: str = ""
    mac_ann: float = 0.0
    ac: float = 0.0
    mac: float = 0.0
    host_ops: float = 0.0
    spikes: float = 0.0          # Σ|y| per inference (SFN sites)
    active: float = 0.0          # neurons with y ≠ 0 per inference
    neurons: int = 0
    level_hist: dict = field(default_factory=dict)

    @property
    def firing_rate(self) -> float:
        return self.active / self.neurons if self.neurons else 0.0

    def to_dict(self) -> dict:
        d = {"name": self.name, "op": self.op, "kind": self.kind, "source": self.source, "mac_ann": self.mac_ann,
             "ac": self.ac, "mac": self.mac, "host_ops": self.host_ops, "spikes": self.spikes,
             "neurons": self.neurons, "firing_rate": self.firing_rate}
        if self.level_hist:
            d["level_hist"] = {str(k): v for k, v in sorted(self.level_hist.items())}
        return d


def _fanout(node: Node, x: torch.Tensor) -> torch.Tensor:
    """How many multiply-accumulates read each input element of a weight layer (one sample)."""
    if node.op == "linear":
        return torch.full((1,), float(node.params["weight"].shape[0]))
    a = node.attrs
    xs = torch.ones((1,) + tuple(x.shape[1:]), requires_grad=True)
    with torch.enable_grad():
        y = F.conv2d(xs, torch.ones_like(node.params["weight"]), None, a["stride"], a["padding"], a["dilation"],
                     a["groups"])
        y.sum().backward()
    return xs.grad[0]


class OpCounter:
    """A runtime hook that accumulates per-layer counts over batches."""

    def __init__(self, graph: Graph, spiking: bool = True):
        self.graph = graph
        self.spiking = spiking
        self.layers = {n.name: LayerCount(n.name, n.op, n.kind, n.source) for n in graph.nodes}
        self.samples = 0
        self._shadow: dict[str, torch.Tensor] = {}   # |spike level| carried along spike tensors
        self._fan: dict[str, torch.Tensor] = {}
        self._free = _release_plan(graph)

    def start_batch(self, batch: int) -> None:
        self.samples += batch
        self.batch = batch
        self._shadow = {}

    def __call__(self, node: Node, args: list, out: torch.Tensor, extra: dict) -> None:
        self._count(node, args, out, extra)
        for name in self._free.get(node.name, ()):
            self._shadow.pop(name, None)

    def _count(self, node: Node, args: list, out: torch.Tensor, extra: dict) -> None:
        c = self.layers[node.name]
        op = node.op
        if op == "sfn" and "level" in extra:
            lv = extra["level"]
            a = lv.abs().to(torch.float32)
            self._shadow[node.name] = a
            c.neurons = out[0].numel()
            c.spikes += float(a.sum())
            c.active += float((lv != 0).sum())
            vals, counts = torch.unique(lv, return_counts=True)
            for v, k in zip(vals.tolist(), counts.tolist()):
                c.level_hist[v] = c.level_hist.get(v, 0) + k
        elif op == "sfn":
            c.neurons = out[0].numel()
        elif op in ("conv2d", "linear"):
            per_out = node.params["weight"][0].numel() if op == "conv2d" else node.params["weight"].shape[1]
            mac = float(out.numel()) * per_out
            c.mac_ann += mac
            shadow = self._shadow.get(node.inputs[0])
            if shadow is None:
                c.mac += mac
            else:
                if node.name not in self._fan:
                    self._fan[node.name] = _fanout(node, args[0])
                c.ac += float((shadow * self._fan[node.name]).sum())
        elif op == "matmul":
            k = args[0].shape[-1]
            mac = float(out.numel()) * k
            c.mac_ann += mac
            sa, sb = self._shadow.get(node.inputs[0]), self._shadow.get(node.inputs[1])
            if sa is not None:
                c.ac += float(sa.sum()) * args[1].shape[-1]
            elif sb is not None:
                c.ac += float(sb.sum()) * args[0].shape[-2]
            else:
                c.mac += mac
        elif node.kind == "host":
            c.host_ops += float(out.numel())
            if op in ("mul", "div") and len(args) == 1 and node.inputs[0] in self._shadow:
                self._shadow[node.name] = self._shadow[node.inputs[0]]   # scaled spikes stay spikes
        elif node.inputs and node.inputs[0] in self._shadow:
            s = self._shadow[node.inputs[0]]
            if op in _FOLLOW:
                self._shadow[node.name] = _op(node, [s], self.graph, self.batch)
            elif op == "max_pool2d" and not self.graph[self._site_of(node.inputs[0])].params["bounds_neg"].numel():
                self._shadow[node.name] = _op(node, [s], self.graph, self.batch)
            elif op == "avg_pool2d":
                a = node.attrs
                self._shadow[node.name] = F.avg_pool2d(s, a["kernel_size"], a["stride"], a["padding"],
                                                       a["ceil_mode"], a["count_include_pad"], 1)
            elif op == "adaptive_avg_pool2d":
                k = s.shape[-2] * s.shape[-1] / (out.shape[-2] * out.shape[-1])
                self._shadow[node.name] = F.adaptive_avg_pool2d(s, node.attrs["output_size"]) * k
            elif op == "mean":
                self._shadow[node.name] = s.sum(node.attrs["dims"], keepdim=node.attrs["keepdim"])

    def _site_of(self, name: str) -> str:
        n = self.graph[name]
        while n.op != "sfn":
            n = self.graph[n.inputs[0]]
        return n.name

    def result(self) -> "OpCounts":
        s = max(self.samples, 1)
        layers = []
        for c in self.layers.values():
            c = replace(c, **{f: getattr(c, f) / s for f in ("mac_ann", "ac", "mac", "host_ops", "spikes", "active")})
            c.level_hist = {k: v / s for k, v in c.level_hist.items()}
            layers.append(c)
        return OpCounts(layers, self.samples)


@dataclass
class OpCounts:
    layers: list[LayerCount]
    samples: int

    @property
    def mac_ann(self) -> float:
        return sum(c.mac_ann for c in self.layers)

    @property
    def ac_snn(self) -> float:
        return sum(c.ac for c in self.layers)

    @property
    def mac_snn(self) -> float:
        return sum(c.mac for c in self.layers)

    @property
    def host_ops(self) -> float:
        return sum(c.host_ops for c in self.layers)

    def energy_ratio(self, e_ac: float = 0.9, e_mac: float = 4.6) -> float:
        """(#AC_SNN·E_AC + #MAC_SNN·E_MAC) / (#MAC_ANN·E_MAC), eq. 43."""
        return (self.ac_snn * e_ac + self.mac_snn * e_mac) / (self.mac_ann * e_mac) if self.mac_ann else 0.0

    def reported_layers(self) -> list[dict]:
        return [c.to_dict() for c in self.layers
                if c.mac_ann or c.ac or c.mac or c.host_ops or c.neurons]


def count_ops(graph: Graph, batches, spiking: bool = True) -> OpCounts:
    """Run the graph over ``batches`` and return per-inference counts."""
    counter = OpCounter(graph, spiking)
    for xb in batches:
        counter.start_batch(xb.shape[0])
        run(graph, xb, spiking=spiking, hook=counter)
    return counter.result()
