"""Conversion methods: the paper's SFN and the baselines it is compared with (docs/methods.md).

Every method starts from the same calibrated graph (capture → fold BatchNorm → neuron sites →
activation histograms per site, :func:`sfn_deploy.convert.build_graph`) and differs only in the
neuron placed at each site and in how many timesteps the network runs. Each is one :class:`Method`
in the registry :data:`METHODS`, whose ``apply`` the pipeline's last pass runs:

- ``sfn``  Scale-and-Fire neuron, T = 1 (the project's method; λ searched).
- ``if``   rate-coded integrate-and-fire, soft reset, binary spikes, T steps; θ per site is the
           top-p% activation (p = 0.1: the 99.9th percentile, Rueckauer et al. 2017). Site kind
           ``if_neuron`` with one level. Non-linear operations between neurons (Transformers) run
           under ECMT's expectation compensation (the "classic IF + ECM" extension).
- ``mtn``  the multi-threshold neuron at one step that Theorem 1 makes equivalent to ``if``:
           θ_M = θ/T, N = T levels, floor rounding (v(0) = 0); an ``sfn`` site with levels 1..T
           and λ = 1/T, so it runs, counts and exports like any SFN network.
- ``ecmt`` ECMT (Huang et al., ACM MM 2024, from the authors' code): two-sided multi-threshold
           neuron with levels λ·2^k, k < N, one spike per step, round-to-nearest boundaries
           λ(2^k − 1/2), soft reset, T steps; λ = the top-p% value of *all* elements of the site
           (p = 1: the 99th percentile; zeros and negatives included), λ = 0.0125 at post-softmax
           sites; expectation compensation for LayerNorm, softmax, GELU and activation products.
- ``pmsm`` PMSM-R, reconstructed from the abstract (:mod:`sfn_deploy.pmsm`): K-level signed quantisers,
           entropy-initialised, a short quantisation-aware fine-tune, then K-level multi-spike SFN sites, T = 1.
- ``mbe``  MBE, re-implemented from a secondary transcription (:mod:`sfn_deploy.mbe`): multi-basis
           exponential-decay neurons approximate GELU, softmax's 2^x and 1/x and LayerNorm's 1/√x over
           T internal steps per neuron (default 16), training-free; identity neurons encode every weight
           layer's input and both operands of activation products. One pass of the graph (no global steps).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from .calibrate import site_histogram, top_percent
from .errors import UserError
from .ir import Graph, Node
from .passes import configure


@dataclass
class Applied:
    """What a method's ``apply`` leaves beside the graph it changed in place."""
    metrics: dict = field(default_factory=dict)     # added to the converted model's metrics (pmsm, mbe)
    search: dict = field(default_factory=dict)      # the λ search and its chosen point (sfn without --scale)


@dataclass(frozen=True)
class Method:
    """A conversion method: the last pass of :data:`sfn_deploy.convert.PIPELINE` runs its ``apply``.

    ``apply`` ("module:function") names ``f(graph, data, config, *, source, quiet) -> Applied``, which turns
    the calibrated SFN sites of ``graph`` (λ = 1) into the method's neurons in place. It is imported when
    the method runs, so that listing the methods (config checks, ``--help``) imports none of them.
    """
    name: str
    description: str
    defaults: dict              # the options it changes (docs/methods.md)
    apply_ref: str
    multi_step: bool = False    # its network runs T > 1 steps (if_neuron sites)

    def load(self):
        module, function = self.apply_ref.split(":")
        return getattr(importlib.import_module(module), function)

    def apply(self, graph: Graph, data, config, *, source: dict | None = None, quiet: bool = True) -> Applied:
        return self.load()(graph, data, config, source=source or {}, quiet=quiet)


# Adding a method: a module with its apply function, and one line here.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sfn", "Scale-and-Fire neurons, one timestep (the main paper)",
           {"percentile": 1.0, "timesteps": 1}, "sfn_deploy.tuning:apply_sfn"),
    Method("if", "rate-coded IF neurons, soft reset, 99.9th-percentile thresholds, T timesteps",
           {"percentile": 0.1, "timesteps": 64}, "sfn_deploy.methods:apply_baseline", multi_step=True),
    Method("mtn", "multi-threshold neurons at one step, N = T levels of θ/T (Theorem 1's equivalent of IF)",
           {"percentile": 0.1, "timesteps": 64}, "sfn_deploy.methods:apply_baseline"),
    Method("ecmt", "ECMT: power-of-two multi-threshold neurons + expectation compensation, T timesteps",
           {"percentile": 1.0, "timesteps": 4, "levels": 8}, "sfn_deploy.methods:apply_baseline", multi_step=True),
    Method("pmsm", "PMSM-R: signed multi-spike quantisers, entropy initialisation, short QAT fine-tune, T = 1",
           {"percentile": 1.0, "timesteps": 1, "levels": 8}, "sfn_deploy.method_adapters:apply_pmsm"),
    Method("mbe", "MBE: multi-basis exponential-decay neurons for GELU, softmax and LayerNorm, T internal steps",
           {"percentile": 1.0, "timesteps": 16}, "sfn_deploy.method_adapters:apply_mbe"),
)}
MULTI_STEP = tuple(n for n, m in METHODS.items() if m.multi_step)
DEFAULTS = {n: m.defaults for n, m in METHODS.items()}         # per-method option defaults (config reads them)
ECMT_SOFTMAX_LAMBDA = 0.0125                # the authors' softmax_p: smallest level at post-softmax sites


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"option 'method': {method!r} is not one of {', '.join(METHODS)}")


def _numel(shape) -> int:
    out = 1
    for s in shape[1:]:
        out *= int(s)
    return out


def top_of_all(node: Node, polarity: int, p: float, samples: int) -> float:
    """The top-p% value of all elements of the site (zeros and the other sign included), as a magnitude.

    ECMT's threshold: the 1 − p/100 quantile of the whole tensor. When fewer than p% of the elements
    have this sign, that quantile is not of this sign; the top-p% of this sign's values is used instead.
    """
    h = site_histogram(node, polarity)
    total = _numel(node.shape) * samples
    if h.n == 0:
        return 0.0
    above = p / 100.0 * total
    if above >= h.n:
        return top_percent(h, p)
    return h.quantile(1.0 - above / h.n)


def _base_attrs(node: Node, method: str, T: int) -> dict:
    a = node.attrs
    if a["kind"] == "softmax":
        a["kind"] = "dual"
    a.update({"method": method, "T": int(T), "lam": 1.0})
    return a


def to_if(node: Node, T: int, percentile: float, v0: float = 0.0) -> Node:
    """A binary IF site: one level, fires at m ≥ θ (per polarity), soft reset, T steps."""
    a = _base_attrs(node, "if", T)
    a.update({"fire": "if", "M": 1, "levels": [1], "rounding": "floor", "v0": float(v0),
              "theta_pos": top_percent(site_histogram(node, 0), percentile),
              "theta_neg": 0.0 if a.get("absorbs") else top_percent(site_histogram(node, 1), percentile)})
    node.op = "if_neuron"
    return configure(node, 1.0)


def to_mtn(node: Node, T: int, percentile: float, v0: float = 0.0) -> Node:
    """The single-step equivalent of :func:`to_if` (Theorem 1): levels 1..T of θ/T, floor rounding.

    With the IF's v(0) = θ/2 the MTN's v_M(0) = θ_M/2: boundaries (i − 1/2)·θ_M, the paper's rounding.
    """
    if v0 not in (0.0, 0.5):
        raise UserError(f"option 'v0': the MTN supports v0 = 0 or 0.5, got {v0}")
    a = _base_attrs(node, "mtn", T)
    a.update({"fire": "mtn", "M": int(T), "levels": list(range(1, T + 1)), "rounding": "floor" if not v0 else "paper",
              "v0": float(v0),
              "theta_pos": top_percent(site_histogram(node, 0), percentile),
              "theta_neg": 0.0 if a.get("absorbs") else top_percent(site_histogram(node, 1), percentile)})
    return configure(node, 1.0 / T)


def to_ecmt(node: Node, T: int, percentile: float, levels: int, samples: int) -> Node:
    """ECMT's multi-threshold neuron: levels 2^k (k < N) of λ, boundaries λ(2^k − 1/2), one spike per step."""
    softmax = node.attrs["kind"] == "softmax"
    a = _base_attrs(node, "ecmt", T)
    if softmax:
        pos = neg = ECMT_SOFTMAX_LAMBDA
    else:
        pos = top_of_all(node, 0, percentile, samples)
        neg = 0.0 if a.get("absorbs") else top_of_all(node, 1, percentile, samples)
    a.update({"fire": "ecmt", "M": int(levels), "levels": [2 ** k for k in range(levels)], "rounding": "paper",
              "v0": 0.0, "theta_pos": float(pos), "theta_neg": float(neg)})
    node.op = "if_neuron"
    return configure(node, 1.0)


def apply_method(graph: Graph, method: str, timesteps: int, percentile: float, levels: int = 8,
                 samples: int = 1, v0: float = 0.0) -> Graph:
    """Replace every calibrated SFN site of ``graph`` by the method's neuron (in place)."""
    from .simulators.temporal import mark_temporal

    check_method(method)
    if method == "sfn":
        return graph
    if timesteps < 1:
        raise UserError(f"option 'timesteps': must be ≥ 1, got {timesteps}")
    neuron = {"if": lambda node: to_if(node, timesteps, percentile, v0),
              "mtn": lambda node: to_mtn(node, timesteps, percentile, v0),
              "ecmt": lambda node: to_ecmt(node, timesteps, percentile, levels, samples)}.get(method)
    if neuron is None:
        raise UserError(f"method {method!r} is not a baseline of docs/methods.md (if, mtn, ecmt)")
    for node in graph.sites:
        neuron(node)
    graph.method = method
    graph.timesteps = timesteps if method in MULTI_STEP else 1
    if graph.stateful:
        mark_temporal(graph)
    return graph


def apply_baseline(graph: Graph, data, config, *, source: dict | None = None, quiet: bool = True) -> Applied:
    """``apply`` of if, mtn and ecmt (:class:`Method`)."""
    apply_method(graph, config.method, config.timesteps, config.percentile, config.levels,
                 len(data.limit(config.calib_limit)), config.v0)
    return Applied()


def method_of(graph: Graph) -> tuple[str, int]:
    """(method, T it stands for): T is the simulated steps, or for ``mtn`` the IF steps it is equivalent to."""
    if graph.method == "mtn":
        return "mtn", max((int(s.attrs.get("T", 1)) for s in graph.sites), default=1)
    if graph.method == "mbe":      # T = internal steps of each MBE neuron (the graph runs one pass)
        return "mbe", max((int(n.attrs.get("T", 1)) for n in graph.nodes if "mbe_fn" in n.attrs), default=1)
    return graph.method, graph.timesteps


def require_single_step(model, target: str) -> None:
    """Refuse, naming the method, a network a single-timestep exporter cannot express.

    ``sfn`` and ``mtn`` networks are single-step SFN graphs and export; ``if`` and ``ecmt`` hold
    stateful multi-timestep neurons (and expectation-compensated operations) that no exporter lowers;
    ``mbe`` holds MBE neurons (T internal steps) and spiking decompositions that no exporter lowers.
    """
    graph = getattr(model, "graph", model)
    if graph.method == "mbe":
        T = method_of(graph)[1]
        raise UserError(f"{target} export refused: the network was converted with --method mbe (MBE neurons of "
                        f"T = {T} internal steps, spiking softmax/LayerNorm/GELU decompositions and spike-"
                        f"coincidence products); the {target} exporter has no lowering for them. Simulate it with "
                        f"the torch backend instead (the source ANN still exports with --ann to ONNX).")
    if graph.stateful:
        raise UserError(f"{target} export refused: the network was converted with --method {graph.method} "
                        f"(T = {graph.timesteps} timesteps, stateful if_neuron sites); the {target} exporter "
                        f"handles single-timestep networks only (--method sfn or mtn). Simulate it with the torch "
                        f"backend instead.")
