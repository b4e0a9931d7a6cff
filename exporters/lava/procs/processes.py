"""Lava processes of an exported SFN network, with their floating_pt and fixed_pt models.

Lava's compiler finds process models by executing every module in this folder, so this
module has no import-time side effects and imports only numpy and Lava (and, inside host
models, sfn-deploy's torch reference ops).

* :class:`SFNNeuron`: one Scale-and-Fire neuron per unit, one timestep, no state kept between
  steps (samples stream one per step). Graded lowering (Loihi 2 style): the payload is the
  integer spike level. Channel lowering (Loihi 1 style): binary spikes on N parallel threshold
  channels per unit. Fixed point: a 24-bit membrane v = a_in + bias, overflow of the incoming
  accumulator counted, saturation counted.
* :class:`SFNConv`: Lava's ``Conv`` (same ports and Vars) whose models vectorise the
  convolution (one BLAS product instead of scipy's per-channel loop) and, in fixed point,
  count the 24-bit wrap-arounds Lava's Conv performs silently.
* :class:`HostOp`: the operations neuro-cores cannot do (LayerNorm, softmax, GELU, products of
  two spike tensors, residual adds, max pooling of graded spikes, layout), run on the host with
  the torch reference's own kernels; also the input encoder and the output decoder.
* :class:`NpySource`: streams one sample per timestep from a ``.npy`` file (``Var.set`` moves
  one element at a time, far too slow for data sets).

Taps: a process given a ``tap`` path prefix writes what it produced at step t into row t−1 of
``.npy`` memory maps (spike levels, pre-activations, counters), so the runner and the per-layer
parity harness read every layer without sink processes.
"""
from __future__ import annotations

import re

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol
from lava.proc.conv.process import Conv

MAX_PORTS = 256          # host blocks have at most this many ports of each kind (in, out, hout)
HOST_WIDTHS = (6, 16, 64, MAX_PORTS)   # HostOp, HostOp16, HostOp64, HostOp256: ports of each kind
ACC_BITS = 24            # Loihi's membrane / dendritic accumulator width


def _open_tap(path: str, steps: int, width: int, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(steps, width))


# -- SFN neuron ---------------------------------------------------------------------------------------------

class SFNNeuron(AbstractProcess):
    """Scale-and-Fire neuron layer (n units). Inputs on ``a_in`` are summed by Lava.

    Fires level ``table_pos[k]`` where k = number of positive thresholds ≤ v, or
    ``−table_neg[j]`` where j = number of negative thresholds ≤ −v (SPEC §4).
    ``s_out`` sends the signed level (graded payload); ``s_pos`` / ``s_neg`` send the positive and
    negative parts separately: graded magnitudes, or with ``channels=True`` binary spikes of the
    Np·n (Nn·n) threshold channels, copy index outermost (channel g of unit i at g·n + i).
    """

    def __init__(self, *, shape, bias, thr_pos, thr_neg, table_pos, table_neg, channels=False,
                 tap=None, steps=0, record=True, name=None):
        n = int(np.prod(shape))
        npos, nneg = max(len(thr_pos), 1), max(len(thr_neg), 1)
        super().__init__(shape=(n,), channels=bool(channels), n_pos=len(thr_pos), n_neg=len(thr_neg),
                         tap=tap, steps=int(steps), record=bool(record), name=name)
        self.a_in = InPort(shape=(n,))
        self.s_out = OutPort(shape=(n,))
        self.s_pos = OutPort(shape=(n * npos,) if channels else (n,))
        self.s_neg = OutPort(shape=(n * nneg,) if channels else (n,))
        big = np.iinfo(np.int32).max
        self.bias = Var(shape=(n,), init=np.asarray(bias).reshape(n))
        self.thr_pos = Var(shape=(npos,), init=np.asarray(thr_pos) if len(thr_pos) else np.array([big]))
        self.thr_neg = Var(shape=(nneg,), init=np.asarray(thr_neg) if len(thr_neg) else np.array([big]))
        self.table_pos = Var(shape=(npos + 1,), init=np.asarray(table_pos)[:npos + 1] if len(thr_pos)
                             else np.zeros(2, np.int32))
        self.table_neg = Var(shape=(nneg + 1,), init=np.asarray(table_neg)[:nneg + 1] if len(thr_neg)
                             else np.zeros(2, np.int32))


class _SFNModel(PyLoihiProcessModel):
    taps = None

    def _membrane(self, a):            # overridden by the fixed-point model
        return a + self.bias

    def _fire(self, v):
        kp = np.searchsorted(self.thr_pos, v, side="right") if self.proc_params["n_pos"] else np.zeros(v.shape, int)
        kn = np.searchsorted(self.thr_neg, -v, side="right") if self.proc_params["n_neg"] else np.zeros(v.shape, int)
        level = np.where(kp > 0, self.table_pos.astype(np.int64)[kp], -self.table_neg.astype(np.int64)[kn])
        return kp, kn, level

    def run_spk(self):
        a = self.a_in.recv()
        v = self._membrane(a)
        kp, kn, level = self._fire(v)
        self.s_out.send(level)
        if self.proc_params["channels"]:
            self.s_pos.send((kp[None, :] > np.arange(self.s_pos.shape[0] // kp.size)[:, None]).reshape(-1))
            self.s_neg.send((kn[None, :] > np.arange(self.s_neg.shape[0] // kn.size)[:, None]).reshape(-1))
        else:
            self.s_pos.send(np.maximum(level, 0))
            self.s_neg.send(np.maximum(-level, 0))
        self._record(v, level)

    def _record(self, v, level):
        tap = self.proc_params["tap"]
        if tap is None or self.time_step > self.proc_params["steps"]:
            return
        if self.taps is None:
            n, steps = v.size, self.proc_params["steps"]
            self.taps = {"count": _open_tap(tap + ".count.npy", 1, 2, np.int64)}
            if self.proc_params["record"]:
                self.taps.update(level=_open_tap(tap + ".level.npy", steps, n, np.int32),
                                 pre=_open_tap(tap + ".pre.npy", steps, n, self._pre_dtype))
        row = self.time_step - 1
        if self.proc_params["record"]:
            self.taps["level"][row] = level
            self.taps["pre"][row] = v
        self.taps["count"][0] = self._counts


@implements(proc=SFNNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PySFNNeuronFloat(_SFNModel):
    """Float model: v rounded to float32 like the torch reference, then compared."""
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s_pos: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s_neg: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    bias: np.ndarray = LavaPyType(np.ndarray, float)
    thr_pos: np.ndarray = LavaPyType(np.ndarray, np.float32)
    thr_neg: np.ndarray = LavaPyType(np.ndarray, np.float32)
    table_pos: np.ndarray = LavaPyType(np.ndarray, np.int32)
    table_neg: np.ndarray = LavaPyType(np.ndarray, np.int32)
    _pre_dtype = np.float32
    _counts = (0, 0)

    def _membrane(self, a):
        return (a + self.bias).astype(np.float32)


@implements(proc=SFNNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PySFNNeuronFixed(_SFNModel):
    """Fixed-point model: integer accumulator plus integer bias in a 24-bit membrane.

    An incoming accumulator beyond ±2^23 would have wrapped in Loihi's 24-bit dendrite (Lava's
    Python Dense does not model it): counted as overflow. The membrane saturates at ±2^23:
    counted as saturation. Both counts are written to the tap."""
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s_pos: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s_neg: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    bias: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    thr_pos: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    thr_neg: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    table_pos: np.ndarray = LavaPyType(np.ndarray, np.int32)
    table_neg: np.ndarray = LavaPyType(np.ndarray, np.int32)
    _pre_dtype = np.int32

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self._counts = np.zeros(2, np.int64)        # overflow, saturation (units × steps)

    def _membrane(self, a):
        lim = 1 << (ACC_BITS - 1)
        a = np.asarray(a, np.int64)
        self._counts[0] += int(np.count_nonzero((a >= lim) | (a < -lim)))
        v = a + self.bias.astype(np.int64)
        sat = (v >= lim) | (v < -lim)
        self._counts[1] += int(np.count_nonzero(sat))
        return np.clip(v, -lim, lim - 1)


# -- convolution --------------------------------------------------------------------------------------------

class SFNConv(Conv):
    """Lava's Conv with a vectorised model (and, in fixed point, a count of 24-bit wrap-arounds)."""

    def __init__(self, *, tap=None, steps=0, **kwargs):
        super().__init__(**kwargs)
        self.proc_params.overwrite("tap", tap)
        self.proc_params.overwrite("steps", int(steps))


def lava_conv(x_whc: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    """Lava's Conv semantics (true convolution, (W, H, C) layout, kernel (C_out, kW, kH, C_in/g))
    as one float64 matrix product per group: exact for integers below 2^53."""
    c_out, kw, kh, cg = w.shape
    sx, sy = stride
    px, py = padding
    dx, dy = dilation
    x = np.pad(x_whc, ((px, px), (py, py), (0, 0)))
    wf = w[:, ::-1, ::-1, :]                          # convolution → correlation
    ow = (x.shape[0] - dx * (kw - 1) - 1) // sx + 1
    oh = (x.shape[1] - dy * (kh - 1) - 1) // sy + 1
    out = np.empty((ow, oh, c_out), np.float64)
    og = c_out // groups
    if cg == 1 and og == 1:                            # depthwise (pooling): one window sum per channel
        for i in range(kw):
            for j in range(kh):
                part = x[i * dx:i * dx + sx * (ow - 1) + 1:sx, j * dy:j * dy + sy * (oh - 1) + 1:sy, :] * wf[:, i, j, 0]
                out = part if i == 0 and j == 0 else out + part
        return out
    for g in range(groups):
        xg = x[:, :, g * cg:(g + 1) * cg]
        cols = np.empty((ow, oh, kw, kh, cg), np.float64)
        for i in range(kw):
            for j in range(kh):
                cols[:, :, i, j, :] = xg[i * dx:i * dx + sx * (ow - 1) + 1:sx, j * dy:j * dy + sy * (oh - 1) + 1:sy, :]
        wg = wf[g * og:(g + 1) * og].reshape(og, -1)
        out[:, :, g * og:(g + 1) * og] = (cols.reshape(ow * oh, -1) @ wg.T).reshape(ow, oh, og)
    return out


class _ConvModel(PyLoihiProcessModel):
    # int32, not Lava's int8: a depthwise pooling Conv has hundreds of groups
    kernel_size: np.ndarray = LavaPyType(np.ndarray, np.int32)
    stride: np.ndarray = LavaPyType(np.ndarray, np.int32)
    padding: np.ndarray = LavaPyType(np.ndarray, np.int32)
    dilation: np.ndarray = LavaPyType(np.ndarray, np.int32)
    groups: np.ndarray = LavaPyType(np.ndarray, np.int32)
    num_message_bits: np.ndarray = LavaPyType(np.ndarray, np.int8, precision=5)
    weight_exp: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=8)
    num_weight_bits: np.ndarray = LavaPyType(np.ndarray, np.int8, precision=5)
    buf = None
    wraps = 0
    tap_file = None

    def run_spk(self):
        if self.buf is None:
            self.buf = np.zeros(self.a_out.shape)      # cast to the port's type when sent
        self.a_out.send(self.buf)
        s = self.s_in.recv()
        if self.num_message_bits.item() == 0:
            s = s.astype(bool)
        acc = lava_conv(np.asarray(s, np.float64), np.asarray(self.weight, np.float64), self.stride, self.padding,
                        self.dilation, int(self.groups[0]))
        self.buf = self._clamp(acc)

    def _clamp(self, acc):
        return acc


@implements(proc=SFNConv, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PySFNConvFloat(_ConvModel):
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float, precision=24)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    a_buf: np.ndarray = LavaPyType(np.ndarray, float)
    weight: np.ndarray = LavaPyType(np.ndarray, float)


@implements(proc=SFNConv, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PySFNConvFixed(_ConvModel):
    """Wraps at 24 bits like Lava's PyConvModelFixed; counts the wrapped outputs into the tap. Unlike
    Lava's model it honours ``weight_exp`` (≥ 0) as the Conv process documents it (weight · 2^weight_exp)."""
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    a_buf: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    weight: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=8)

    def _clamp(self, acc):
        acc = acc.astype(np.int64) << int(self.weight_exp.item())   # the Conv process's weight·2^weight_exp
        lim = 1 << (ACC_BITS - 1)
        wrapped = (acc + lim) % (1 << ACC_BITS) - lim
        n = int(np.count_nonzero(wrapped != acc))
        tap = self.proc_params["tap"]
        if tap is not None and self.time_step <= self.proc_params["steps"]:
            self.wraps += n
            if self.tap_file is None:
                self.tap_file = _open_tap(tap + ".count.npy", 1, 2, np.int64)
            self.tap_file[0, 0] = self.wraps
        return wrapped.astype(np.int32)


# -- host operations ----------------------------------------------------------------------------------------

class HostOp(AbstractProcess):
    """Work done off the neuro-cores, one timestep, no delay of its own.

    ``program`` (plain data, see ``exporters.lava.plan``) says how to decode each input port (spike
    levels, synaptic accumulators with their scale and bias, or values), how many steps to delay
    each input (aligning paths of different synaptic depth), which converted-graph nodes to
    evaluate, and how to encode each output port (values, or integers at a given scale)."""

    width = HOST_WIDTHS[0]      # ports of each kind; wider blocks are the subclasses HostOp16, HostOp64, ...

    def __init__(self, *, in_sizes, out_sizes, program, tap=None, steps=0, name=None):
        """in_sizes: sizes of in0, in1, ...; out_sizes: {port name: size} for the out{i} ports (to the
        chip: integers in fixed point) and hout{i} ports (to other host blocks: always float). The process
        has ``width`` ports of each kind (Lava wants a model to type exactly its process's ports, so a
        model's port count is fixed); the unused ones have size 1 and stay unconnected."""
        k = self.width
        ports = [re.fullmatch(r"(out|hout)([0-9]+)", p) for p in out_sizes]
        if len(in_sizes) > k or any(m is None or int(m.group(2)) >= k for m in ports):
            raise ValueError(f"{type(self).__name__} has {k} input ports and {k} of each output kind; use "
                             "host_process(...) for the class that fits")
        super().__init__(program=program, tap=tap, steps=int(steps), name=name)
        for i in range(k):
            setattr(self, f"in{i}", InPort(shape=(int(in_sizes[i]) if i < len(in_sizes) else 1,)))
            for kind in ("out", "hout"):
                setattr(self, f"{kind}{i}", OutPort(shape=(int(out_sizes.get(f"{kind}{i}", 1)),)))


class _HostModel(PyLoihiProcessModel):
    runner = None

    def run_spk(self):
        if self.runner is None:
            from sfn_deploy.exporters.lava.host import HostRunner  # torch, single-threaded, in the child
            self.runner = HostRunner(self.proc_params["program"], self.proc_params["tap"],
                                     self.proc_params["steps"])
        ports_in = [getattr(self, f"in{i}") for i in range(self.runner.n_in)]
        ports_out = [getattr(self, name) for name in self.runner.out_ports]
        try:
            outs = self.runner.step([p.recv() for p in ports_in], self.time_step)
        except BaseException:       # send something first: a model raising before send deadlocks Lava
            for p in ports_out:
                p.send(np.zeros(p.shape))
            raise
        for p, o in zip(ports_out, outs, strict=True):
            p.send(o)


def _host_ports(model, dtype, width: int) -> None:
    for i in range(width):
        setattr(model, f"in{i}", LavaPyType(PyInPort.VEC_DENSE, dtype))
        setattr(model, f"out{i}", LavaPyType(PyOutPort.VEC_DENSE, dtype))
        setattr(model, f"hout{i}", LavaPyType(PyOutPort.VEC_DENSE, float))


def _host_models(proc: type, width: int, suffix: str = "") -> None:
    """The floating_pt model (float ports everywhere) and the fixed_pt model (integer ports: what the host
    sends to the chip is integer payloads) of a HostOp class with ``width`` ports of each kind, defined in
    this module (Lava finds models among the classes of the process's module)."""
    for tag_name, dtype, kind in (("floating_pt", float, "Float"), ("fixed_pt", np.int32, "Fixed")):
        model = type(f"PyHostOp{suffix}{kind}", (_HostModel,), {"__module__": __name__, "__doc__": (
            "Float ports everywhere." if kind == "Float" else "Integer ports to the chip.")})
        _host_ports(model, dtype, width)
        model = implements(proc=proc, protocol=LoihiProtocol)(requires(CPU)(tag(tag_name)(model)))
        globals()[model.__name__] = model


_host_models(HostOp, HOST_WIDTHS[0])
for _w in HOST_WIDTHS[1:]:
    globals()[f"HostOp{_w}"] = type(f"HostOp{_w}", (HostOp,), {"__module__": __name__, "width": _w, "__doc__": (
        f"A HostOp with {_w} ports of each kind (a host block with many inputs: DenseNet's concatenations).")})
    _host_models(globals()[f"HostOp{_w}"], _w, str(_w))


def host_process(n_ports: int) -> type:
    """The narrowest HostOp class with at least n_ports ports of each kind."""
    for w in HOST_WIDTHS:
        if n_ports <= w:
            return HostOp if w == HOST_WIDTHS[0] else globals()[f"HostOp{w}"]
    raise ValueError(f"a host block has at most {MAX_PORTS} ports of each kind, not {n_ports}")


# -- data source --------------------------------------------------------------------------------------------

class NpySource(AbstractProcess):
    """Sends row t−1 of a (steps, n) ``.npy`` file at step t; zeros after the last row."""

    def __init__(self, *, path, shape, name=None):
        super().__init__(path=str(path), name=name)
        self.s_out = OutPort(shape=(int(np.prod(shape)),))


@implements(proc=NpySource, protocol=LoihiProtocol)
@requires(CPU)
class PyNpySource(PyLoihiProcessModel):
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    data = None

    def run_spk(self):
        if self.data is None:
            self.data = np.load(self.proc_params["path"], mmap_mode="r")
        t = self.time_step - 1
        self.s_out.send(np.asarray(self.data[t], float) if t < len(self.data) else np.zeros(self.s_out.shape))
