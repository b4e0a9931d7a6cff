"""Structural validation of a Lava plan read from a bundle: everything the builder, the worker and the
runner take from a plan is re-derived from the plan's own structure and compared, so a bundle from a
buggy or foreign writer (whose checksum is right) is refused before Lava starts, naming the block and
the field (docs/lava.md, "Bundle format"; docs/security.md).
"""
from __future__ import annotations

import math
import re

import numpy as np

from ...errors import UserError
from ...ir import OPS
from .plan import LOWERINGS, MAX_HOST_PORTS, PRECISIONS, WEIGHT_BITS, Block, Plan, ceil_div


def one_line(text: str) -> str:
    return " ".join(str(text).split())


SYNAPSES = ("dense", "sparse", "conv")
KINDS = ("neuron", *SYNAPSES, "host")
DECODES = ("value", "levels", "acc")
ENCODES = ("value", "int", "levels", "levels_pos", "levels_neg", "chan_pos", "chan_neg")
HOST_OPS = frozenset(op for op, (kind, _) in OPS.items() if kind in ("host", "pool", "layout", "product", "io"))
NODE_KEYS = {"name", "op", "inputs", "attrs", "params", "shape", "bdim", "source"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")       # also a file name in the run's folder (taps)
_HOST_PORT = re.compile(r"(in|out|hout)([0-9]+)\Z")
_MAX_W = {"conv": 2 ** (WEIGHT_BITS - 1) - 1, "dense": 2 * (2 ** (WEIGHT_BITS - 1) - 1)}


class _Invalid(Exception):
    """A problem in one block or field; validate_plan adds where it is."""


def show(v) -> str:
    return one_line(repr(v))[:60]


def _int(v, what: str, lo: int | None = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (lo is not None and v < lo):
        raise _Invalid(f"{what} is {show(v)}, not an integer" + (f" ≥ {lo}" if lo is not None else ""))
    return int(v)


def _num(v, what: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) \
            or (positive and v <= 0):
        raise _Invalid(f"{what} is {show(v)}, not a finite{' positive' if positive else ''} number")
    return float(v)


def _ints(v, what: str, n: int | None = None, lo: int | None = 0) -> list:
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n):
        raise _Invalid(f"{what} is {show(v)}, not a list of {n if n is not None else ''} integers".replace("  ", " "))
    return [_int(x, f"{what}[{i}]", lo) for i, x in enumerate(v)]


def _nums(v, what: str) -> list:
    if not isinstance(v, (list, tuple)):
        raise _Invalid(f"{what} is {show(v)}, not a list of numbers")
    return [_num(x, f"{what}[{i}]") for i, x in enumerate(v)]


def _bool(v, what: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise _Invalid(f"{what} is {show(v)}, not true/false")
    return bool(v)


def _str(v, what: str) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"{what} is {show(v)}, not a string")
    return v


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _array(b: Block, key: str, shape=None, ndim: int | None = None) -> np.ndarray:
    if key not in b.arrays:
        raise _Invalid(f"array {key!r} is missing")
    a = b.arrays[key]
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise _Invalid(f"array {key!r} has dtype {getattr(a, 'dtype', type(a).__name__)} (numbers only)")
    if shape is not None and a.shape != tuple(shape):
        raise _Invalid(f"array {key!r} has shape {list(a.shape)}; the block's attributes give {list(shape)}")
    if ndim is not None and a.ndim != ndim:
        raise _Invalid(f"array {key!r} has {a.ndim} axes, not {ndim}")
    return a


def _integral(b: Block, key: str, limit: float | None = None) -> None:
    a = np.asarray(b.arrays[key], np.float64)
    if a.size and (np.any(a != np.rint(a)) or np.abs(a).max() > (limit if limit is not None else 2.0 ** 53)):
        raise _Invalid(f"array {key!r} holds values that are not fixed-point integers"
                       + (f" within ±{limit:g}" if limit is not None else ""))


def _ascending(b: Block, key: str) -> None:
    a = b.arrays[key]
    if a.size > 1 and np.any(np.diff(np.asarray(a, np.float64)) < 0):
        raise _Invalid(f"array {key!r} is not in ascending order")


def _neuron(b: Block, fixed: bool, lowering: str) -> dict:
    a = b.attrs
    n = _int(a.get("n"), "attrs.n", 1)
    if _prod(_ints(a.get("shape"), "attrs.shape", lo=1)) != n:
        raise _Invalid(f"attrs.shape {a.get('shape')} does not hold attrs.n = {n} units")
    npos, nneg = _int(a.get("n_pos"), "attrs.n_pos"), _int(a.get("n_neg"), "attrs.n_neg")
    channels = _bool(a.get("channels"), "attrs.channels")
    if channels != (lowering == "channels" and not a.get("pool")):
        raise _Invalid(f"attrs.channels is {channels} in the {lowering} lowering")
    if _bool(a.get("dual"), "attrs.dual") != (nneg > 0):
        raise _Invalid(f"attrs.dual is {a['dual']} with attrs.n_neg = {nneg}")
    scale = _num(a.get("scale"), "attrs.scale", positive=True)
    _array(b, "bias", (n,))
    for side, k in (("pos", npos), ("neg", nneg)):
        thr = _array(b, f"thr_{side}", (k,))
        bounds = _array(b, f"bounds_{side}", (k,))
        _ascending(b, f"thr_{side}")
        # thresholds are the boundaries in membrane units: the boundaries themselves, or ceil(b / scale)
        want = ceil_div(bounds, scale) if fixed else bounds
        if not np.array_equal(np.asarray(thr, np.float64), np.asarray(want, np.float64)):
            raise _Invalid(f"array 'thr_{side}' is not array 'bounds_{side}' in membrane units (attrs.scale {scale:g})")
    table = _array(b, "table", ndim=1)
    if table.size < max(npos, nneg) + 1:
        raise _Invalid(f"array 'table' has {table.size} levels; attrs.n_pos/n_neg need {max(npos, nneg) + 1}")
    _array(b, "steps", (2,))
    _integral(b, "table")
    if fixed:
        for key in ("bias", "thr_pos", "thr_neg"):
            _integral(b, key)
    return {"s_out": n, "s_pos": n * max(npos, 1) if channels else n, "s_neg": n * max(nneg, 1) if channels else n}


def _held(a: dict, width: int, what: str) -> tuple[int, int]:
    """(copies, columns per copy) of a synaptic block whose stored weight has ``width`` copy columns."""
    copies = _int(a.get("copies"), "attrs.copies", 1)
    ids = a.get("copy_ids")
    if ids is not None:
        ids = _ints(ids, "attrs.copy_ids")
        if not ids or len(set(ids)) != len(ids) or max(ids) >= copies:
            raise _Invalid(f"attrs.copy_ids {ids} are not distinct copies below attrs.copies = {copies}")
    held = len(ids) if ids is not None else copies
    if width % held:
        raise _Invalid(f"array 'weight' has {width} {what}, not a multiple of the {held} channel copies it holds")
    return copies, width // held


def _synapse(b: Block, fixed: bool, lowering: str) -> dict:
    a = b.attrs
    if a.get("polarity") not in ("analog", "pos", "neg", "pool"):
        raise _Invalid(f"attrs.polarity is {show(a.get('polarity'))}")
    if _bool(a.get("graded"), "attrs.graded") != (lowering == "graded" or a["polarity"] == "analog"):
        raise _Invalid(f"attrs.graded is {a['graded']} for {a['polarity']} input in the {lowering} lowering")
    _num(a.get("scale"), "attrs.scale", positive=True)
    e = _int(a.get("weight_exp"), "attrs.weight_exp", lo=None)
    if (e and not fixed) or abs(e) > 64:
        raise _Invalid(f"attrs.weight_exp is {e}" + (" in floating point" if e and not fixed else ""))
    shift = _int(a.get("shift", 0), "attrs.shift")
    split = _bool(a.get("split", False), "attrs.split")
    if split and (not fixed or a.get("copy_ids") is not None):
        raise _Invalid("attrs.split is true outside fixed point or in an exponent group")
    if shift and (not fixed or (a.get("copy_ids") is None and not split) or shift > 24):
        raise _Invalid(f"attrs.shift is {shift}; only a fixed-point exponent group (attrs.copy_ids) or the coarse "
                       "half of a split layer (attrs.split) shifts, by at most 24 bits")
    if b.kind == "conv":
        w = _array(b, "weight", ndim=4)
        w_in, h_in, c_in = _ints(a.get("input_shape"), "attrs.input_shape", 3, lo=1)
        sx, sy = _ints(a.get("stride"), "attrs.stride", 2, lo=1)
        px, py = _ints(a.get("padding"), "attrs.padding", 2)
        dx, dy = _ints(a.get("dilation"), "attrs.dilation", 2, lo=1)
        groups = _int(a.get("groups"), "attrs.groups", 1)
        c_out, o_h, o_w = _ints(a.get("out_chw"), "attrs.out_chw", 3, lo=1)
        copies, per = _held(a, w.shape[3], "input channels")
        c_out_w, kw, kh = w.shape[:3]
        ow = (w_in + 2 * px - dx * (kw - 1) - 1) // sx + 1
        oh = (h_in + 2 * py - dy * (kh - 1) - 1) // sy + 1
        if c_out_w != c_out or copies * per * groups != c_in or c_out % groups or (ow, oh) != (o_w, o_h):
            raise _Invalid(f"array 'weight' has shape {list(w.shape)}; attrs (input_shape {a['input_shape']}, "
                           f"out_chw {a['out_chw']}, groups {groups}, copies {copies}) do not fit it")
        ports = {"s_in": w_in * h_in * c_in, "a_out": c_out * o_h * o_w}
    else:
        w = _array(b, "weight", ndim=2)
        tokens = _int(a.get("tokens"), "attrs.tokens", 1)
        if b.kind == "dense" and tokens != 1:
            raise _Invalid(f"attrs.tokens is {tokens}; a dense block has one")
        copies, per = _held(a, w.shape[1], "columns")
        in_n, out_n = _int(a.get("in_n"), "attrs.in_n", 1), _int(a.get("out_n"), "attrs.out_n", 1)
        if (w.shape[0] * tokens, per * tokens) != (out_n, in_n):
            raise _Invalid(f"array 'weight' has shape {list(w.shape)}; attrs (out_n {out_n}, in_n {in_n}, "
                           f"tokens {tokens}, copies {copies}) give [{out_n // tokens}, {in_n // tokens} per copy]")
        ports = {"s_in": copies * per * tokens, "a_out": w.shape[0] * tokens}
    if fixed:
        _integral(b, "weight", _MAX_W["conv" if b.kind == "conv" else "dense"])
        if b.kind != "conv" and np.any(np.asarray(b.arrays["weight"], np.int64) % 2):
            raise _Invalid("array 'weight' holds odd values; fixed-point Dense/Sparse weights are stored as 2w "
                           "(weight_exp − 1)")
    return ports


def _host(b: Block) -> tuple[dict, dict, dict]:
    """(input port sizes, output port sizes, {input port: delay}) of a host block, after checking its program."""
    a = b.attrs
    if not isinstance(a.get("inputs"), list) or not isinstance(a.get("outputs"), list):
        raise _Invalid("attrs.inputs / attrs.outputs are not lists")
    sites = _host_sites(a)
    shapes: dict = {}                   # value name -> shape, as the ports and the program compute them
    ins, delays = _host_inputs(b, shapes)
    _host_nodes(b, shapes)
    outs = _host_outputs(a, sites, shapes)
    return ins, outs, delays


def _host_sites(a: dict) -> dict:
    """attrs.sites (the SFN sites whose spikes the block encodes) and attrs.lattice, checked."""
    sites = a.get("sites", {})
    if not isinstance(sites, dict):
        raise _Invalid("attrs.sites is not an object")
    for s, info in sites.items():
        if not isinstance(info, dict):
            raise _Invalid(f"attrs.sites[{s!r}] is not an object")
        npos, nneg = _int(info.get("n_pos"), f"attrs.sites[{s!r}].n_pos"), _int(info.get("n_neg"),
                                                                                f"attrs.sites[{s!r}].n_neg")
        if len(_nums(info.get("steps"), f"attrs.sites[{s!r}].steps")) != 2:
            raise _Invalid(f"attrs.sites[{s!r}].steps does not hold 2 steps")
        if len(_nums(info.get("table"), f"attrs.sites[{s!r}].table")) < max(npos, nneg) + 1:
            raise _Invalid(f"attrs.sites[{s!r}].table is shorter than its thresholds need")
    lattice = a.get("lattice", {})
    if not isinstance(lattice, dict) or any(v not in sites for v in lattice.values()):
        raise _Invalid("attrs.lattice names a site missing from attrs.sites")
    return sites


def _host_inputs(b: Block, shapes: dict) -> tuple[dict, dict]:
    """({input port: size}, {input port: delay}) from attrs.inputs; adds each port's value to ``shapes``."""
    a = b.attrs
    ins, delays = {}, {}
    if len(a["inputs"]) > MAX_HOST_PORTS:
        raise _Invalid(f"{len(a['inputs'])} input ports (a host block has {MAX_HOST_PORTS})")
    for i, s in enumerate(a["inputs"]):
        what = f"attrs.inputs[{i}]"
        if not isinstance(s, dict) or s.get("port") != f"in{i}":
            raise _Invalid(f"{what}.port is {show(s.get('port') if isinstance(s, dict) else s)}, not 'in{i}'")
        size = _int(s.get("size"), f"{what}.size", 1)
        shape = _ints(s.get("shape"), f"{what}.shape", lo=1)
        if _prod(shape) != size:
            raise _Invalid(f"{what}.shape {shape} does not hold its size {size}")
        if s.get("decode") not in DECODES:
            raise _Invalid(f"{what}.decode is {show(s.get('decode'))}")
        if s["decode"] == "acc":
            _host_accumulator(b, s, i, size, what)
        delays[f"in{i}"] = _int(s.get("delay"), f"{what}.delay")
        shapes[_str(s.get("value"), f"{what}.value")] = shape
        ins[f"in{i}"] = size
    return ins, delays


def _host_accumulator(b: Block, s: dict, i: int, size: int, what: str) -> None:
    """An input port that decodes accumulated synaptic input: its scale and its optional bias array."""
    _num(s.get("scale"), f"{what}.scale", positive=True)
    bias = _bool(s.get("bias", False), f"{what}.bias")
    if bias != (f"in{i}.bias" in b.arrays):
        raise _Invalid(f"{what}.bias is {bias}, but array 'in{i}.bias' is {'missing' if bias else 'there'}")
    if bias and _array(b, f"in{i}.bias").size != size:
        raise _Invalid(f"array 'in{i}.bias' has {b.arrays[f'in{i}.bias'].size} values; port in{i} has {size}")


def _host_nodes(b: Block, shapes: dict) -> None:
    """attrs.nodes: host operations only, each reading values computed before it; adds each to ``shapes``."""
    nodes = b.attrs.get("nodes", [])
    if not isinstance(nodes, list):
        raise _Invalid("attrs.nodes is not a list")
    for i, nd in enumerate(nodes):
        what = f"attrs.nodes[{i}]"
        if not isinstance(nd, dict) or set(nd) - NODE_KEYS or "name" not in nd or "op" not in nd:
            raise _Invalid(f"{what} is not a converted-graph node")
        name = _str(nd["name"], f"{what}.name")
        if nd["op"] not in HOST_OPS:
            raise _Invalid(f"{what} ({name}) has op {show(nd['op'])}, not a host operation")
        if not isinstance(nd.get("attrs", {}), dict) or not isinstance(nd.get("params", []), list):
            raise _Invalid(f"{what} ({name}): attrs / params malformed")
        _host_node_inputs(nd, name, what, shapes)
        for k in nd.get("params", []):
            _array(b, f"{name}.{k}")
        if nd.get("bdim") is not None:
            _int(nd["bdim"], f"{what}.bdim", lo=None)
        shapes[name] = _ints(nd.get("shape", []), f"{what}.shape")


def _host_node_inputs(nd: dict, name: str, what: str, shapes: dict) -> None:
    """A host node reads only values already computed; inputs and constants read none (a constant has a value)."""
    ins_ = nd.get("inputs", [])
    if not isinstance(ins_, list) or (not ins_) != (nd["op"] in ("input", "constant")):
        raise _Invalid(f"{what} ({name}): inputs {show(ins_)} do not fit op {nd['op']}")
    for src in ins_:
        if src not in shapes:
            raise _Invalid(f"{what} ({name}) reads {show(src)}, which no input port or earlier node gives")
    if nd["op"] == "input" and name not in shapes:
        raise _Invalid(f"{what} ({name}) is an input no input port gives")
    if nd["op"] == "constant" and "value" not in nd.get("params", []):
        raise _Invalid(f"{what} ({name}) is a constant without a value")


def _host_outputs(a: dict, sites: dict, shapes: dict) -> dict:
    """{output port: size} from attrs.outputs: unique ports, known encodings, sizes their values give."""
    outs: dict = {}
    for i, o in enumerate(a["outputs"]):
        what = f"attrs.outputs[{i}]"
        m = _HOST_PORT.match(o.get("port", "") if isinstance(o, dict) and isinstance(o.get("port"), str) else "")
        if not m or m.group(1) == "in" or int(m.group(2)) >= MAX_HOST_PORTS or o["port"] in outs:
            raise _Invalid(f"{what}.port is {show(o.get('port') if isinstance(o, dict) else o)}")
        size = _int(o.get("size"), f"{what}.size", 1)
        enc = o.get("encode")
        if enc not in ENCODES:
            raise _Invalid(f"{what}.encode is {show(enc)}")
        value = o.get("value")
        if value not in shapes:
            raise _Invalid(f"{what}.value {show(value)} is not computed in the block")
        want = _prod(shapes[value])
        if enc == "int":
            _num(o.get("scale"), f"{what}.scale", positive=True)
        if enc.startswith("chan_"):
            site = sites.get(o.get("site"))
            if site is None:
                raise _Invalid(f"{what}.site {show(o.get('site'))} is missing from attrs.sites")
            want *= site["n_pos"] if enc.endswith("pos") else site["n_neg"]
        if size != want:
            raise _Invalid(f"{what}.size is {size}; its value {value} gives {want}")
        outs[o["port"]] = size
    return outs


def validate_plan(plan: Plan, where: str = "invalid Lava plan") -> None:
    """Refuse (UserError ``where: block …: field …``, one line) a plan whose parts contradict each other:
    array dtypes, values and shapes against the blocks' declared sizes; connections to unknown blocks or
    ports, between ports of different sizes or kinds that never connect; stages, host delays and the
    latency against what the connections give; scales against what each producer sends; input and
    output shapes; sites. What :mod:`.build`, the worker and :func:`.run_lava` take from a plan is
    checked here, before Lava starts. (What host nodes compute, their attributes, is not: a host
    program that fails fails inside the run, as an internal error.)"""
    try:
        _validate(plan)
    except _Invalid as e:
        raise UserError(f"{where}: {one_line(str(e))}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise UserError(f"{where}: malformed plan ({type(e).__name__}: {one_line(str(e))[:200]})") from None


_FEEDS = {"neuron": SYNAPSES + ("host",), "dense": ("neuron", "host"), "sparse": ("neuron", "host"),
          "conv": ("neuron", "host"), "host": KINDS}        # which block kinds a block of each kind sends to


def _validate(plan: Plan) -> None:
    if plan.lowering not in LOWERINGS:
        raise _Invalid(f"'lowering' is {show(plan.lowering)}")
    if plan.precision not in PRECISIONS:
        raise _Invalid(f"'precision' is {show(plan.precision)}")
    in_shape = _ints(plan.input_shape, "'input_shape'", lo=1)
    out_shape = _ints(plan.output_shape, "'output_shape'", lo=1)
    latency = _int(plan.latency, "'latency'")
    by_name, ports_in, ports_out, delays = _check_blocks(plan)
    for role, name in (("input_block", plan.input_block), ("output_block", plan.output_block)):
        if not isinstance(name, str) or name not in by_name or by_name[name].kind != "host":
            raise _Invalid(f"'{role}' {show(name)} is not a host block of the plan")
    inp, out = by_name[plan.input_block], by_name[plan.output_block]
    if ports_in[inp.name].get("in0") != _prod(in_shape):
        raise _Invalid(f"block {inp.name}: port in0 takes {ports_in[inp.name].get('in0')} values; 'input_shape' "
                       f"{in_shape} gives {_prod(in_shape)}")
    if inp.attrs["inputs"][0]["decode"] != "value" or delays[inp.name]["in0"]:
        raise _Invalid(f"block {inp.name}: port in0 takes the samples as they come (decode 'value', delay 0)")
    if ports_out[out.name].get("hout0") != _prod(out_shape) or out.attrs["outputs"][0]["port"] != "hout0":
        raise _Invalid(f"block {out.name}: port hout0 gives {ports_out[out.name].get('hout0')} values; "
                       f"'output_shape' {out_shape} gives {_prod(out_shape)}")
    incoming = _check_connections(plan, by_name, ports_in, ports_out, inp)
    stage = _check_stages(plan, by_name, incoming, delays)
    if latency != stage[out.name]:
        raise _Invalid(f"'latency' is {latency}; the plan's structure gives {stage[out.name]} (the stage of block "
                       f"{out.name})")
    _check_sites(plan, by_name)
    _check_scales(plan, by_name)
    _check_exponent_groups(plan)


def _check_blocks(plan: Plan):
    """Each block by itself: name, kind, arrays, attributes; its ports' sizes (and host input delays)."""
    if not isinstance(plan.blocks, list) or not plan.blocks:
        raise _Invalid("'blocks' holds no block")
    fixed = plan.precision == "fixed_pt"
    by_name: dict = {}
    ports_in: dict = {}                 # block -> {port: size}
    ports_out: dict = {}
    delays: dict = {}                   # host block -> {port: delay}
    for b in plan.blocks:
        if not isinstance(b.name, str) or not _NAME.match(b.name):
            raise _Invalid(f"block name {show(b.name)} is not a plain identifier")
        if b.name in by_name:
            raise _Invalid(f"two blocks are named {b.name}")
        by_name[b.name] = b
        try:
            if not isinstance(b.kind, str) or b.kind not in KINDS:
                raise _Invalid(f"kind is {show(b.kind)}")
            _int(b.stage, "stage")
            if not isinstance(b.ir, list) or not all(isinstance(x, str) for x in b.ir):
                raise _Invalid("ir is not a list of node names")
            consts = {f"{n['name']}.value" for n in b.attrs.get("nodes", []) if isinstance(n, dict)
                      and n.get("op") == "constant" and isinstance(n.get("name"), str)} if b.kind == "host" else set()
            for k, arr in b.arrays.items():
                _array(b, k)
                if k not in consts and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                    raise _Invalid(f"array {k!r} holds non-finite values")
            if b.kind == "neuron":
                ports_out[b.name] = _neuron(b, fixed, plan.lowering)
                ports_in[b.name] = {"a_in": b.attrs["n"]}
            elif b.kind in SYNAPSES:
                p = _synapse(b, fixed, plan.lowering)
                ports_in[b.name], ports_out[b.name] = {"s_in": p["s_in"]}, {"a_out": p["a_out"]}
            else:
                ports_in[b.name], ports_out[b.name], delays[b.name] = _host(b)
        except _Invalid as e:
            raise _Invalid(f"block {b.name}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise _Invalid(f"block {b.name}: malformed attributes "
                           f"({type(e).__name__}: {one_line(str(e))[:200]})") from e
    return by_name, ports_in, ports_out, delays


def _check_connections(plan: Plan, by_name: dict, ports_in: dict, ports_out: dict, inp: Block) -> dict:
    """Known blocks and ports, kinds that connect, equal sizes, Conv layout views; every input port fed
    (the input block's in0 by the caller's source only). Returns {block: its incoming connections}."""
    if not isinstance(plan.connections, list):
        raise _Invalid("'connections' is not a list")
    incoming: dict = {name: [] for name in by_name}
    seen = set()
    for i, c in enumerate(plan.connections):
        what = f"connections[{i}]"
        if not isinstance(c, dict) or set(c) != {"src", "src_port", "dst", "dst_port", "view"}:
            raise _Invalid(f"{what} is not a connection (src, src_port, dst, dst_port, view)")
        for end in ("src", "dst"):
            if not isinstance(c[end], str) or c[end] not in by_name:
                raise _Invalid(f"{what}: {end} {show(c[end])} is not a block of the plan")
        src, dst = by_name[c["src"]], by_name[c["dst"]]
        size_out = ports_out[src.name].get(c["src_port"]) if isinstance(c["src_port"], str) else None
        size_in = ports_in[dst.name].get(c["dst_port"]) if isinstance(c["dst_port"], str) else None
        if size_out is None:
            raise _Invalid(f"{what}: block {src.name} has no output port {show(c['src_port'])}")
        if size_in is None or (dst is inp and c["dst_port"] == "in0"):
            raise _Invalid(f"{what}: block {dst.name} has no input port {show(c['dst_port'])} to connect")
        if dst.kind not in _FEEDS[src.kind]:
            raise _Invalid(f"{what}: a {src.kind} block ({src.name}) does not feed a {dst.kind} block ({dst.name})")
        _check_view(what, c["view"], src, dst)
        if size_out != size_in:
            raise _Invalid(f"{what}: {src.name}.{c['src_port']} gives {size_out} values, {dst.name}.{c['dst_port']} "
                           f"takes {size_in}")
        key = (src.name, c["src_port"], dst.name, c["dst_port"])
        if key in seen:
            raise _Invalid(f"{what}: {src.name}.{c['src_port']} → {dst.name}.{c['dst_port']} is connected twice")
        seen.add(key)
        incoming[dst.name].append(c)
    _check_fed(plan, ports_in, inp, incoming)
    return incoming


def _check_view(what: str, view, src: Block, dst: Block) -> None:
    """Lava's Conv ports are (W, H, C): a view on the way in and out of a Conv block, nowhere else."""
    if dst.kind == "conv":
        if not (isinstance(view, list) and len(view) == 4 and view[0] == "to_whc"
                and list(view[1:])[::-1] == list(dst.attrs["input_shape"])):
            raise _Invalid(f"{what}: view {show(view)} is not ['to_whc', C, H, W] of block {dst.name}'s "
                           "attrs.input_shape")
    elif view != (["from_whc"] if src.kind == "conv" else None):
        raise _Invalid(f"{what}: view {show(view)} does not apply between {src.kind} {src.name} and {dst.kind} "
                       f"{dst.name}")


def _check_fed(plan: Plan, ports_in: dict, inp: Block, incoming: dict) -> None:
    """Every input port connected (the input block's in0 by the caller's source), a synaptic block from one source."""
    for b in plan.blocks:
        fed = {c["dst_port"] for c in incoming[b.name]}
        for port in ports_in[b.name]:
            if port not in fed and not (b is inp and port == "in0"):
                raise _Invalid(f"block {b.name}: input port {port} is connected to nothing")
        if b.kind in SYNAPSES and len(incoming[b.name]) != 1:
            raise _Invalid(f"block {b.name}: port s_in has {len(incoming[b.name])} sources; a synaptic block reads one")


def _check_stages(plan: Plan, by_name: dict, incoming: dict, delays: dict) -> dict:
    """Every synaptic block adds one step, neurons and host blocks none (plan.py, "Timing"): each block's
    stage, and each host input's delay, from the connections, in topological order. Returns the stages."""
    indeg = {name: len(incoming[name]) for name in by_name}
    users: dict = {name: [] for name in by_name}
    for c in plan.connections:
        users[c["src"]].append(c["dst"])
    ready = [name for name, k in indeg.items() if k == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for d in users[name]:
            indeg[d] -= 1
            if indeg[d] == 0:
                ready.append(d)
    if len(order) != len(by_name):
        raise _Invalid(f"the connections form a cycle (through block {next(n for n in by_name if indeg[n])})")
    stage: dict = {}
    for name in order:
        b = by_name[name]
        srcs = sorted({stage[c["src"]] for c in incoming[name]})
        if b.kind in SYNAPSES:
            s = srcs[0] + 1
        elif b.kind == "neuron":
            if len(srcs) != 1:
                raise _Invalid(f"block {name}: its inputs arrive at different stages {srcs}; a neuron has no delay")
            s = srcs[0]
        else:                          # host: inputs from earlier stages wait in FIFOs
            s = max(srcs, default=0)
            for c in incoming[name]:
                d = s - stage[c["src"]]
                if delays[name][c["dst_port"]] != d:
                    raise _Invalid(f"block {name}: input port {c['dst_port']} has delay {delays[name][c['dst_port']]}; "
                                   f"its source {c['src']} (stage {stage[c['src']]}) gives {d}")
        if b.stage != s:
            raise _Invalid(f"block {name}: stage is {b.stage}; its connections give {s}")
        stage[name] = s
    return stage


def _check_sites(plan: Plan, by_name: dict) -> None:
    """plan.sites (read by run_lava: tap files, rows, scales) and the sites host blocks decode with."""
    if not isinstance(plan.sites, dict):
        raise _Invalid("'sites' is not an object")
    for site, info in plan.sites.items():
        what = f"sites[{show(site)}]"
        if not isinstance(info, dict) or not isinstance(info.get("block"), str) \
                or info["block"] not in by_name or by_name[info["block"]].kind != "neuron":
            raise _Invalid(f"{what}: block {show(info.get('block') if isinstance(info, dict) else info)} is not a "
                           "neuron block of the plan")
        blk = by_name[info["block"]]
        if info.get("stage") != blk.stage:
            raise _Invalid(f"{what}: stage is {show(info.get('stage'))}; block {blk.name} is at stage {blk.stage}")
        if info.get("scale") != blk.attrs["scale"]:
            raise _Invalid(f"{what}: scale is {show(info.get('scale'))}; block {blk.name}'s is {blk.attrs['scale']}")
    for b in plan.blocks:       # a host block decodes and encodes a site's levels with the neuron's own table
        for site, info in (b.attrs["sites"].items() if b.kind == "host" else ()):
            ref = plan.sites.get(site)
            blk = by_name[ref["block"]] if ref else None
            if blk is None or (info["n_pos"], info["n_neg"]) != (blk.attrs["n_pos"], blk.attrs["n_neg"]) \
                    or info["steps"] != blk.arrays["steps"].tolist() or info["table"] != blk.arrays["table"].tolist():
                raise _Invalid(f"block {b.name}: attrs.sites[{show(site)}] is not that site's neuron (table, steps, "
                               "thresholds)")


def _check_scales(plan: Plan, by_name: dict) -> None:
    """What each consumer assumes of the numbers it receives is what its producer sends: a synaptic block's
    accumulator unit is 2^weight_exp times its input's unit (1 for spike levels), a neuron's membrane unit is
    its synaptic input's, a host port decoding accumulators uses the producer's unit."""
    fixed = plan.precision == "fixed_pt"
    for i, c in enumerate(plan.connections):
        src, dst = by_name[c["src"]], by_name[c["dst"]]
        o = next(o for o in src.attrs["outputs"] if o["port"] == c["src_port"]) if src.kind == "host" else None
        field = f"block {dst.name}: attrs.scale"
        if dst.kind in SYNAPSES:
            have = dst.attrs["scale"]
            want = 2.0 ** dst.attrs["weight_exp"] * (o["scale"] if o is not None and o["encode"] == "int" else 1.0)
        elif dst.kind == "neuron":
            have = dst.attrs["scale"]
            if src.kind in SYNAPSES:
                want = src.attrs["scale"]
            else:
                assert o is not None, "_FEEDS: only synaptic and host blocks feed a neuron"
                if o["encode"] != ("int" if fixed else "value"):
                    raise _Invalid(f"connections[{i}]: {src.name}.{c['src_port']} sends {show(o['encode'])} to "
                                   f"neuron block {dst.name}")
                want = o["scale"] if fixed else have
        else:
            k = int(c["dst_port"][2:])
            spec = dst.attrs["inputs"][k]
            if (spec["decode"] == "acc") != (src.kind in SYNAPSES):
                raise _Invalid(f"block {dst.name}: port {c['dst_port']} decodes {spec['decode']!r} from a {src.kind} "
                               f"block ({src.name})")
            if spec["decode"] != "acc":
                continue
            have, want, field = spec["scale"], src.attrs["scale"], f"block {dst.name}: attrs.inputs[{k}].scale"
        if not math.isclose(have, want, rel_tol=1e-12):
            raise _Invalid(f"{field} is {have:g}; connections[{i}] from {src.name} give {want:g}")


def _check_exponent_groups(plan: Plan) -> None:
    """Fixed-point channel lowering: the processes of one layer and polarity hold each channel copy exactly
    once, with distinct shifts, the layer's smallest exponent unshifted (plan._exponent_groups). Split
    layers (graded, fixed point): per polarity one coarse process shifted more than one fine (unshifted, or
    shifted to a residual sum's common unit: plan._common_units)."""
    halves: dict = {}
    for b in plan.blocks:
        if b.kind in SYNAPSES and b.attrs.get("split"):
            halves.setdefault((str(b.attrs.get("layer")), b.attrs["polarity"]), []).append(b)
    for (layer, pol), blks in halves.items():
        shifts = sorted(b.attrs.get("shift", 0) for b in blks)
        if len(blks) != 2 or shifts[0] >= shifts[1] \
                or blks[0].arrays["weight"].shape != blks[1].arrays["weight"].shape:
            raise _Invalid(f"blocks {', '.join(b.name for b in blks)}: a split layer {layer} ({pol}) has one coarse "
                           "(shifted) and one fine (unshifted) process of equal shape")
    groups: dict = {}
    for b in plan.blocks:
        if b.kind in SYNAPSES and b.attrs.get("copy_ids") is not None:
            groups.setdefault((str(b.attrs.get("layer")), b.attrs["polarity"]), []).append(b)
    for (layer, pol), blks in groups.items():
        ids = sorted(i for b in blks for i in b.attrs["copy_ids"])
        copies = {b.attrs["copies"] for b in blks}
        shifts = [b.attrs.get("shift", 0) for b in blks]
        if len(copies) != 1 or ids != list(range(copies.pop())) or len(set(shifts)) != len(shifts):
            raise _Invalid(f"blocks {', '.join(b.name for b in blks)}: attrs.copy_ids / attrs.shift do not split the "
                           f"channel copies of layer {layer} ({pol}) into exponent groups")
    for layer in {layer for layer, _ in groups}:
        if min(b.attrs.get("shift", 0) for (lay, _), blks in groups.items() if lay == layer for b in blks):
            raise _Invalid(f"layer {layer}: no exponent group has attrs.shift 0")
