"""The host side of a Lava run: what a :class:`HostOp` process computes each timestep.

Host work uses the torch reference interpreter's own operations (the op table, ``ops.apply``) on one
sample, so LayerNorm, softmax and GELU give the reference's floats; torch runs single-threaded
(Lava forks its processes, and a multi-threaded OpenMP pool does not survive a fork).

Spike tensors that only pass through layout ops and max pooling stay integer levels (max is
monotone in the level), so pooled spikes go back to the chip as levels, exactly.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ...ir import Graph, Node
from ...ops import apply
from .plan import ACC_BITS, LATTICE_OPS

_LIM = (1 << (ACC_BITS - 1)) - 1


class HostRunner:
    def __init__(self, program: dict, tap: str | None, steps: int):
        torch.set_num_threads(1)
        self.inputs, self.outputs = program["inputs"], program["outputs"]
        self.sites = program["sites"]                 # site -> steps, table, n_pos, n_neg
        self.lattice = dict(program["lattice"])       # value -> site whose levels it carries
        arrays = program["arrays"]
        self.nodes = [Node.from_dict({**d, "params": {k: torch.from_numpy(np.asarray(arrays[f"{d['name']}.{k}"]))
                                                    for k in d["params"]}}) for d in program["nodes"]]
        stubs = [Node(s["value"], "input", shape=list(s["shape"]), bdim=s.get("bdim", 0)) for s in self.inputs
                 if s["value"] not in {n.name for n in self.nodes}]
        self.graph = Graph(stubs + self.nodes, self.nodes[-1].name if self.nodes else self.inputs[0]["value"])
        self.fifos = [deque(np.zeros(s["size"]) for _ in range(s["delay"])) for s in self.inputs]
        self.out_ports = [o["port"] for o in self.outputs]
        self.n_in = len(self.inputs)
        self.tap, self.steps = tap, steps
        self.tap_file: np.ndarray | None = None
        self.arrays = program.get("arrays", {})
        self.fixed = program.get("precision") == "fixed_pt"

    # decode
    def _values(self, name: str, t: torch.Tensor) -> torch.Tensor:
        site = self.lattice.get(name)
        if site is None:
            return t
        s = self.sites[site]
        steps = torch.tensor(s["steps"], dtype=torch.float32)
        if s["n_neg"]:
            return torch.where(t >= 0, t * steps[0], t * steps[1])
        return t * steps[0]

    def _decode(self, spec: dict, x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x, np.float64).reshape(spec["shape"])
        if spec["decode"] == "acc" and self.fixed:
            # float32 arithmetic (the integer accumulator is exact in float32 within 24 bits), so that the
            # integer reference (reference.py) computes the same bits with torch's float32 ops
            v32 = x.astype(np.float32) * np.float32(spec["scale"])
            if spec.get("bias"):
                v32 = v32 + np.asarray(self.arrays[f"{spec['port']}.bias"], np.float32).reshape(spec["shape"])
            return torch.from_numpy(np.ascontiguousarray(v32, np.float32))
        if spec["decode"] == "acc":
            v = x * spec["scale"]
            if spec.get("bias"):
                v = v + self.arrays[f"{spec['port']}.bias"].reshape(spec["shape"])
            return torch.from_numpy(v.astype(np.float32))
        return torch.from_numpy(x.astype(np.float32))      # values, or levels (integers, exact in float32)

    # encode
    def _encode(self, spec: dict, name: str, env: dict) -> np.ndarray:
        t = env[name]
        enc = spec["encode"]
        if enc == "levels":
            return t.reshape(-1).double().numpy()
        if enc == "int":        # rint(value · fl32(1 / scale)) in float32 (reference.py computes the same bits)
            y = self._values(name, t).reshape(-1).float().numpy() * np.float32(1.0 / spec["scale"])
            return np.clip(np.rint(y.astype(np.float64)), -_LIM, _LIM)
        if enc == "value":
            return self._values(name, t).reshape(-1).double().numpy()
        level = t.reshape(-1).double().numpy()
        pol = enc.split("_")[1]
        if enc.startswith("levels_"):
            return np.maximum(level, 0) if pol == "pos" else np.maximum(-level, 0)
        s = self.sites[spec["site"]]                     # chan_pos / chan_neg: cumulative threshold channels
        table = np.asarray(s["table"], np.float64)
        mag = np.maximum(level, 0) if pol == "pos" else np.maximum(-level, 0)
        k = np.searchsorted(table, mag, side="left")     # index of the level in the table
        g = np.arange(s["n_pos"] if pol == "pos" else s["n_neg"])[:, None]
        return (k[None, :] > g).reshape(-1).astype(np.float64)

    def step(self, received: list, time_step: int) -> list:
        env: dict = {}
        for spec, x, fifo in zip(self.inputs, received, self.fifos, strict=True):
            if spec["delay"]:
                fifo.append(np.array(x, copy=True))
                x = fifo.popleft()
            env[spec["value"]] = self._decode(spec, x)
        for node in self.nodes:
            if node.op == "constant":
                env[node.name] = node.params["value"]
                continue
            if node.op == "input":
                continue
            lattice_in = node.inputs and node.inputs[0] in self.lattice
            if node.op in LATTICE_OPS and lattice_in and node.name in self.lattice:
                args = [env[node.inputs[0]]]             # levels pass through
            else:
                args = [self._values(i, env[i]) for i in node.inputs]
            env[node.name] = apply(node, args, self.graph, 1)
        outs = [self._encode(o, o["value"], env) for o in self.outputs]
        if self.tap is not None and time_step <= self.steps:
            if self.tap_file is None:
                self.tap_file = np.lib.format.open_memmap(self.tap + ".npy", mode="w+", dtype=np.float32,
                                                          shape=(self.steps, outs[0].size))
            tap_file = self.tap_file
            tap_file[time_step - 1] = outs[0]
        return outs
