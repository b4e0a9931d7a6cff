"""Build Lava processes from a plan, for our runner or for a user's own Lava program.

    net = load_network("bundle/", precision="fixed_pt")
    my_source.s_out.connect(net.in_port)        # one sample per timestep, flattened C·H·W
    net.out_port.connect(my_sink.a_in)          # logits, ``net.latency`` steps later
    my_source.run(condition=RunSteps(n), run_cfg=net.run_config())
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import UserError
from .plan import Plan


@dataclass
class LavaNetwork:
    """The processes of one plan. ``in_port`` takes the input (float, one sample per step);
    ``out_port`` gives the output values ``latency`` steps after the sample entered."""
    plan: Plan
    processes: dict
    in_port: object
    out_port: object
    latency: int

    def run_config(self):
        from lava.magma.core.run_configs import Loihi2SimCfg
        return Loihi2SimCfg(select_tag=self.plan.precision)


def _copy_blocks(b) -> tuple[list, int]:
    """The weights of each channel copy g (None where the process holds no synapse for it: fixed-point
    channel lowering splits copies by weight exponent, see plan._exponent_groups)."""
    w, a = b.arrays["weight"], b.attrs
    ids = a.get("copy_ids") or list(range(a["copies"]))
    axis = 3 if b.kind == "conv" else 1
    per = w.shape[axis] // len(ids)
    held = {g: np.take(w, range(i * per, (i + 1) * per), axis=axis) for i, g in enumerate(ids)}
    return [held.get(g) for g in range(a["copies"])], per


def _full_weight(b) -> np.ndarray:
    blocks, per = _copy_blocks(b)
    if b.attrs.get("copy_ids") is None:
        return b.arrays["weight"]
    like = next(x for x in blocks if x is not None)
    return np.concatenate([x if x is not None else np.zeros_like(like) for x in blocks],
                          axis=3 if b.kind == "conv" else 1)


def _sparse_matrix(b) -> Any:                   # a scipy.sparse CSR matrix
    """kron(I_tokens, W) per channel copy, side by side: spikes of copy g of unit (token t, feature j)
    sit at g·n + t·in + j."""
    from scipy import sparse
    blocks, per = _copy_blocks(b)
    t = b.attrs["tokens"]
    rows = t * b.arrays["weight"].shape[0]
    eye = sparse.identity(t, format="csr")
    return sparse.hstack([sparse.kron(eye, sparse.csr_matrix(x)) if x is not None
                          else sparse.csr_matrix((rows, t * per)) for x in blocks], format="csr")


MAX_SYNAPSES = 300_000_000      # stored weights Lava's Python simulator would hold (~12 bytes each as CSR)


def stored_synapses(plan: Plan) -> int:
    """Weights the built processes hold: Dense matrices, Sparse block-diagonal (tokens × W per held copy),
    Conv kernels (shared)."""
    total = 0
    for b in plan.blocks:
        w = b.arrays.get("weight")
        if w is None:
            continue
        total += int(np.count_nonzero(w)) * (b.attrs.get("tokens", 1) if b.kind == "sparse" else 1)
    return total


def _check_size(plan: Plan) -> None:
    n = stored_synapses(plan)
    if n > MAX_SYNAPSES:
        raise UserError(f"Lava simulation refused: the network holds {n:,} synapses (over {MAX_SYNAPSES:,}; about "
                        f"{n * 12 / 2**30:.0f} GiB in Lava's Python processes, which store every synapse, also each "
                        f"token's copy of a linear layer). The bundle itself is fine; simulate a smaller model, or "
                        f"run the bundle on hardware")


def build(plan: Plan, tap_dir: str | None = None, steps: int = 0, record: bool = False,
          neuron: str = "sfn") -> LavaNetwork:
    """Instantiate every block as a Lava process and connect them. With ``tap_dir``, neurons and
    fixed-point convolutions record levels, pre-activations and counters for ``steps`` steps, and the
    output decoder records the outputs; neurons record levels and pre-activations only with ``record``.

    ``neuron="lif"`` puts Lava's own LIF process (binary spikes, same size, threshold at the first
    boundary) where each SFN neuron was: the same network built from Lava's stock neuron, the
    baseline of the throughput benchmark (its outputs mean nothing)."""
    _check_size(plan)                     # before importing Lava (it sets the multiprocessing start method)
    from lava.proc.dense.process import Dense
    from lava.proc.sparse.process import Sparse

    from .procs.processes import SFNConv, SFNNeuron, host_process

    fixed = plan.precision == "fixed_pt"
    tap = (lambda name: os.path.join(tap_dir, name)) if tap_dir else (lambda name: None)
    procs: dict = {}
    for b in plan.blocks:
        a, arr = b.attrs, b.arrays
        if b.kind == "neuron" and neuron == "lif":
            from lava.proc.lif.process import LIF
            vth = float(np.asarray(arr["thr_pos"])[0]) if len(arr["thr_pos"]) else 1.0
            decay = 4095 if fixed else 1.0           # no state kept between steps, like the SFN
            procs[b.name] = LIF(shape=(a["n"],), du=decay, dv=decay, vth=max(int(vth), 1) if fixed else vth,
                                name=b.name)
        elif b.kind == "neuron":
            dtype = np.int64 if fixed else np.float64
            procs[b.name] = SFNNeuron(
                shape=(a["n"],), bias=np.asarray(arr["bias"], dtype), thr_pos=np.asarray(arr["thr_pos"], dtype),
                thr_neg=np.asarray(arr["thr_neg"], dtype), table_pos=arr["table"], table_neg=arr["table"],
                channels=a["channels"], tap=tap(b.name), steps=steps, record=record, name=b.name)
        elif b.kind in ("dense", "sparse", "conv"):
            bits = 24 if a["graded"] else 0
            if b.kind == "conv":
                w = np.asarray(_full_weight(b), np.int32 if fixed else np.float64)
                procs[b.name] = SFNConv(weight=w, input_shape=tuple(a["input_shape"]), padding=tuple(a["padding"]),
                                        stride=tuple(a["stride"]), dilation=tuple(a["dilation"]), groups=a["groups"],
                                        num_message_bits=bits, weight_exp=a.get("shift", 0) if fixed else 0,
                                        tap=tap(b.name) if fixed else None, steps=steps, name=b.name)
            else:
                w = _sparse_matrix(b) if b.kind == "sparse" else _full_weight(b)
                w = w.astype(np.int32) if fixed else w.astype(np.float64)
                kw = {"weight_exp": a.get("shift", 0) - 1} if fixed else {}   # weights stored as 2w (see plan.py)
                cls = Sparse if b.kind == "sparse" else Dense
                procs[b.name] = cls(weights=w, num_message_bits=bits, name=b.name, **kw)
        else:
            program = {"inputs": a["inputs"], "outputs": a["outputs"], "nodes": a["nodes"], "sites": a["sites"],
                       "lattice": a["lattice"], "arrays": dict(arr), "precision": plan.precision}
            width = max([len(a["inputs"]), *(int(o["port"].removeprefix("h")[3:]) + 1 for o in a["outputs"])])
            procs[b.name] = host_process(width)(
                in_sizes=[s["size"] for s in a["inputs"]], out_sizes={o["port"]: o["size"] for o in a["outputs"]},
                program=program, tap=tap("output") if b.name == plan.output_block else None, steps=steps,
                name=b.name)
    for c in plan.connections:
        port = c["src_port"]
        if neuron == "lif" and plan.block(c["src"]).kind == "neuron":
            if port == "s_neg":
                continue
            port = "s_out"
        src = getattr(procs[c["src"]], port)
        view = c["view"]
        if view and view[0] == "to_whc":
            src = src.reshape(tuple(view[1:])).transpose([2, 1, 0])
        elif view and view[0] == "from_whc":
            src = src.transpose([2, 1, 0]).flatten()
        src.connect(getattr(procs[c["dst"]], c["dst_port"]))
    return LavaNetwork(plan, procs, procs[plan.input_block].in0, procs[plan.output_block].hout0, plan.latency)
