"""The conversion pipeline: :data:`PIPELINE` is the ordered list of passes that :func:`convert` runs and
``sfn-deploy inspect`` shows.

The passes up to ``calibrate`` (:func:`build_graph`) give every method the same calibrated graph at
λ = 1; the last pass, ``scale``, runs the chosen method's ``apply`` (:mod:`sfn_deploy.methods`): for
``sfn`` a fixed λ or the λ search, for the baselines their neurons. Evaluating the result is
:mod:`sfn_deploy.evaluation`'s job, apart from this module.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import bias_correction, distributed, fidelity
from .calibrate import calibrate
from .capture import capture
from .config import FINE_IF_MISSED, INPUT_SHARE, ConvertConfig, load_config
from .data import Dataset, Validation
from .errors import UserError
from .evaluation import (
    PairedDrop,
    ann_reference,
    budget_warning,
    check_data,
    drop_of,
    evaluate,
    from_passes,
    images_needed,
    predict,
)
from .ir import Graph, GraphError, validate_graph
from .methods import METHODS, Applied
from .model_file import ConvertedModel
from .neurons import linear_levels
from .passes import fold_batchnorm, folds_offset, input_readers, insert_sfn, offset_input, set_levels, set_scale
from .simulators.counting import count_ops


@dataclass
class Conversion:
    """What the passes read (the model, data, options) and write (the graph, what the method left)."""
    model: Any
    data: Dataset
    config: ConvertConfig
    source: dict = field(default_factory=dict)
    quiet: bool = True
    warn: Callable[[str], None] | None = None     # receives warnings (the budget the validation set cannot resolve)
    graph: Graph | None = None
    applied: Applied = field(default_factory=Applied)
    input_abs_max: float | None = None            # max |x| of the calibration images (calibrate sets it)
    sample: Any = None                            # the images capture traced (input encoding reuses them)
    checked: bias_correction.Checked | None = None   # bias correction's validation passes, reused by validate()

    def captured(self) -> Graph:
        """The graph, which the first pass (capture) sets."""
        if self.graph is None:
            raise RuntimeError("the capture pass has not run")
        return self.graph


@dataclass(frozen=True)
class Pass:
    name: str
    description: str
    run: Callable[[Conversion], object]


def _capture(c: Conversion) -> None:
    if c.config.method == "pmsm" and not c.data.labeled:
        raise UserError(f"{c.data.name}: --method pmsm fine-tunes on labels; this data has none")
    c.sample = c.data.head(2)
    graph = capture(c.model, c.sample)
    # auto is resolved here, in the record that the search, bias correction and the converted file read. Without
    # labels nothing else tells a backbone returning N×D from a classifier: the output's producer does.
    val = c.data.validation if c.data.validation is not None else c.data
    headless = not val.labeled and not fidelity.ends_in_weight_layer(graph)
    c.config.fidelity = kind = fidelity.resolve(c.config.fidelity, graph[graph.output].shape, c.model,
                                                several=graph.output_parts is not None, headless=headless)
    if kind == "output" and c.config.method == "pmsm":
        raise UserError("--method pmsm fine-tunes a classifier on labels; this model is converted with output "
                        "fidelity (its output is not N×classes, or --fidelity output)")
    check_data(graph, c.data, kind=kind)
    if c.data.validation is not None:
        check_data(graph, c.data.validation, "model (--val-data)", kind)
    c.graph = graph


def _insert_sfn(c: Conversion) -> None:
    cfg = c.config
    spikes, low = _input_encoding(c)
    cfg.input_encoding = "spikes" if spikes else "analog"      # auto resolved in the record, as fidelity is
    graph = insert_sfn(c.captured(), cfg.levels, cfg.fire, cfg.rounding, cfg.softmax_levels, input_spikes=spikes)
    if not graph.sites:
        raise UserError("the model has no activation feeding a weight layer: nothing to convert into spikes")
    if low:
        offset_input(graph, low)


def _input_encoding(c: Conversion) -> tuple[bool, float]:
    """Whether the input gets a neuron, and the offset it fires above (docs/concepts.md "Input encoding")."""
    cfg, graph = c.config, c.captured()
    if cfg.input_encoding == "spikes" and cfg.method != "sfn":
        raise UserError(f"--input-encoding spikes is an SFN neuron on the input; --method {cfg.method} keeps it "
                        "analog")
    if cfg.input_encoding == "analog" or cfg.method != "sfn":
        return False, 0.0
    readers = input_readers(graph)
    if not readers:
        if cfg.input_encoding == "spikes":
            raise UserError("--input-encoding spikes: the network input is read by more than weight layers "
                            "(through layout ops); only those can read spikes")
        return False, 0.0
    if cfg.input_encoding == "auto":
        macs = {layer.name: layer.mac_ann for layer in count_ops(graph, [c.sample], spiking=False).layers}
        if sum(macs.get(r.name, 0.0) for r in readers) < INPUT_SHARE * sum(macs.values()):
            return False, 0.0
    # the traced images' smallest value (no pass over the data: a value below it is a negative level, and the
    # fold is exact whatever the offset); on every rank the same images
    low = float(c.sample.min())
    if low == 0 or folds_offset(graph, readers):
        return True, low
    return cfg.input_encoding == "spikes", 0.0      # spikes asked for: without an offset


def _calibrate(c: Conversion) -> None:
    cfg, graph = c.config, c.captured()
    c.input_abs_max = 0.0

    def tracked():          # the input range (Lava's fixed-point encoding) from the same pass over the data
        for xb in distributed.shard(c.data.limit(cfg.calib_limit), cfg.batch_size).batches(cfg.batch_size):
            c.input_abs_max = max(c.input_abs_max, float(xb.abs().max()))
            yield xb
    calibrate(graph, tracked(), cfg.percentile, quiet=c.quiet)     # torchrun: the ranks' shares, summed
    c.input_abs_max = distributed.reduce_max(c.input_abs_max)
    try:        # e.g. a BatchNorm with a negative running_var folds into NaN weights
        validate_graph(graph, shapes=False)
    except GraphError as e:
        raise UserError(f"the model converts into an invalid network ({e})") from None


def _scale(c: Conversion) -> None:
    cfg = c.config
    # the resolution rule counts discordant images: output fidelity's cosines have no such floor
    if cfg.tune and cfg.scale is None and c.warn is not None and cfg.fidelity == "accuracy":
        val, record = c.data.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)
        text = budget_warning(len(val), cfg.max_drop, record.available)
        if text:
            c.warn(text)
    c.applied = METHODS[c.config.method].apply(c.captured(), c.data, c.config, source=c.source, quiet=c.quiet)


def correct_biases(graph: Graph, data: Dataset, cfg: ConvertConfig
                   ) -> tuple[dict | None, bias_correction.Checked | None]:
    """The bias correction of ``cfg.correction`` on a graph whose λ is set (convert's last pass; ``tune -o``):
    its record (None when off or not the SFN method), and with ``auto`` its check's validation passes."""
    mode = cfg.correction
    if mode == "off" or cfg.method != "sfn" or graph.stateful:
        return None, None
    x = bias_correction.images(data, cfg.batch_size, cfg.seed)
    val = data.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)[0] if mode == "auto" else None
    return bias_correction.correct(graph, x, mode, val, cfg.batch_size, cfg.goal, fidelity.of(cfg.to_dict()))


def _bias_correction(c: Conversion) -> None:
    record, c.checked = correct_biases(c.captured(), c.data, c.config)
    if record is not None:
        c.applied.metrics["bias_correction"] = record


def _validation_scores(c: Conversion) -> tuple[float, float]:
    """(SNN, ANN) score on the validation images in the state the passes left: from bias correction's check
    when it ran (the correction included), else the search's chosen point."""
    cfg, search = c.config, c.applied.search
    if c.checked is None:
        return search["chosen"]["accuracy"], search["ann_accuracy"]
    val = c.data.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)[0]
    return fidelity.scores(cfg.fidelity, c.checked.snn, c.checked.ann, val.y if val.labeled else None)


@dataclass
class _Check:
    """Images the search did not choose on (:meth:`Dataset.check_split`) and the ANN's reference on them."""
    data: Dataset
    record: Validation
    ref: fidelity.Reference

    def drop(self, graph: Graph, batch_size: int) -> PairedDrop:
        """The SNN's drop against the ANN on these images, in the graph's present state."""
        out = predict(graph, self.data, batch_size, spiking=True, top1=False)
        return drop_of(self.ref.ann, self.ref.scores(out), self.ref.binary)


def _check_images(c: Conversion) -> _Check | None:
    """The check of :func:`_more_levels`: ``check_size`` images the search did not choose on, when there are
    enough to resolve the goal (:func:`images_needed`); else None."""
    cfg = c.config
    need = images_needed(cfg.goal)
    found = c.data.check_split(cfg.check_size, cfg.val_size, cfg.val_fraction, cfg.seed) if cfg.check_size else None
    if found is None or need is None or len(found[0]) < need:
        return None
    data = found[0]         # streamed photos stay streamed: decoded per pass, not held beside the validation images
    return _Check(data, found[1], ann_reference(c.captured(), data, cfg.fidelity, cfg.batch_size))


@dataclass
class _Try:
    """One search of :func:`_more_levels`' ladder and the state it left in the graph."""
    levels: int
    fire: str
    applied: Applied
    checked: bias_correction.Checked | None
    score: tuple[float, float]                  # (SNN, ANN) on the validation images, bias correction included
    check: PairedDrop | None                    # the drop on the images the search did not choose on
    lam: dict[str, float]
    bias: dict[str, tuple[Any, Any]]

    def meets(self, goal: float, checked: bool) -> bool:
        """Within ``goal`` points of the ANN on the validation images, and with ``checked`` on the check's."""
        return self.score[0] >= self.score[1] - goal and not (checked and self.check and self.check.points > goal)

    def rank(self, checked: bool) -> float:
        """How a try ranks when none meets the goal: with ``checked`` by the check's drop (not chosen on), else by
        its validation accuracy."""
        return -self.check.points if checked and self.check is not None else self.score[0]

    def record(self, goal: float) -> dict:
        check = {} if self.check is None else {"check_drop": self.check.points}
        return {"levels": self.levels, "fire": self.fire, "chosen": self.applied.search["chosen"],
                "accuracy": self.score[0], "goal": goal, **check}


def _state(c: Conversion, levels: int, fire: str, check: _Check | None) -> _Try:
    graph = c.captured()
    return _Try(levels, fire, c.applied, c.checked, _validation_scores(c),
                None if check is None else check.drop(graph, c.config.batch_size),
                {s.name: s.attrs["lam"] for s in graph.sites},
                {n.name: (n.params["bias"], n.params["bias_ann"]) for n in graph.nodes if "bias_ann" in n.params})


def _restore(c: Conversion, t: _Try) -> None:
    graph = c.captured()
    bias_correction.revert(graph)
    set_levels(graph, t.levels, c.config.softmax_levels, t.fire)
    set_scale(graph, t.lam)
    for name, (bias, bias_ann) in t.bias.items():
        graph[name].params.update(bias=bias, bias_ann=bias_ann)
    c.applied, c.checked = t.applied, t.checked


def ladder(cfg: ConvertConfig) -> list[tuple[int, str]]:
    """The (M, fire function) searches :func:`_more_levels` tries in turn after the first: ``levels_if_missed``
    with the same fire function, then ``config.FINE_IF_MISSED`` when ``fine_if_missed``; each only when it has
    more linear levels than the tries before it."""
    steps = [(cfg.levels_if_missed or 0, cfg.fire)] + ([FINE_IF_MISSED] if cfg.fine_if_missed else [])
    out: list[tuple[int, str]] = []
    for m, fire in steps:
        if linear_levels(m, fire) > max([linear_levels(cfg.levels, cfg.fire)] +
                                        [linear_levels(*s) for s in out]):
            out.append((m, fire))
    return out


def _more_levels(c: Conversion) -> None:
    """A searched result is checked on images the search did not choose on (``check_size``; its drop there is
    recorded as ``check``). One more than the budget (without one: ``config.GOAL``) below the ANN on the
    validation images, bias correction included, or without a budget on the check's, is searched and corrected
    again at each step of :func:`ladder` (θ and calibration kept; each its own study) until one meets it; the
    kept result is the first that meets it, else the most accurate (without a budget on the check's images when
    there are any). With a budget a miss on the check alone climbs nothing: every step takes the cheapest point
    within the budget on the same validation images, and misses the check as the first did (the bundled CNN:
    0.50, then 0.65 and 0.65 at M 12 and 16 linear, budget 0.3). A fixed λ, M or fire function (``--scale``,
    ``--levels``, ``--fire``) is the user's choice: nothing is retried (docs/concepts.md "The λ search")."""
    cfg, graph = c.config, c.captured()
    if not c.applied.search:
        return
    check = _check_images(c)
    checked = cfg.max_drop is None
    steps = ladder(cfg)
    if check is None and not steps:
        return
    tries = [_state(c, cfg.levels, cfg.fire, check)]
    for m, fire in steps:
        if tries[-1].meets(cfg.goal, checked):
            break
        bias_correction.revert(graph)
        set_levels(graph, m, cfg.softmax_levels, fire)
        suffix = "" if fire == cfg.fire else f"-{fire}"
        again = replace(cfg, levels=m, fire=fire, levels_if_missed=0, fine_if_missed=False,
                        study=None if cfg.study is None else f"{cfg.study}-levels{m}{suffix}")
        c.applied = METHODS[cfg.method].apply(graph, c.data, again, source=c.source, quiet=c.quiet)
        record, c.checked = correct_biases(graph, c.data, again)
        if record is not None:
            c.applied.metrics["bias_correction"] = record
        tries.append(_state(c, m, fire, check))
    kept = tries[-1] if tries[-1].meets(cfg.goal, checked) else max(tries, key=lambda t: t.rank(checked))
    if kept is not tries[-1]:
        _restore(c, kept)
    extra: dict[str, Any] = {}
    if check is not None:
        assert kept.check is not None
        extra["check"] = {**check.record.to_dict(), "drop": kept.check.to_dict()}
    if len(tries) > 1:
        missed = tries[0] if kept is not tries[0] else tries[-1]
        extra.update(levels=kept.levels, fire=kept.fire, missed=missed.record(cfg.goal),
                     tries=[{**t.record(cfg.goal), "kept": t is kept} for t in tries])
    kept.applied.search = {**kept.applied.search, **extra}


PIPELINE: list[Pass] = [
    Pass("capture", "torch.export the model and map every ATen operator to the IR (attention split into q·kᵀ, "
                    "softmax, ·v)", _capture),
    Pass("fold_batchnorm", "fold inference BatchNorm into the preceding conv/linear",
         lambda c: fold_batchnorm(c.captured())),
    Pass("insert_sfn", "place an SFN on each activation feeding a weight layer or activation product (and on the "
                       "input, --input-encoding)", _insert_sfn),
    Pass("calibrate", "θ⁺/θ⁻ = top-p% positive/negative activation per site, o_max per softmax (streaming "
                      "histograms)", _calibrate),
    Pass("scale", "set λ: fixed, or chosen by the accuracy/energy search (--method: the method's neurons "
                  "instead)", _scale),
    Pass("bias_correction", "fold each weight layer's mean SNN−ANN shift into the SNN's bias (auto: kept if "
                            "validation agreement does not fall and the drop stays within the budget or 0.5)",
         _bias_correction),
    Pass("more_levels", "check a searched result on images the search did not choose on; more than the budget (or "
                        "0.5 points) below the ANN there or on the validation images: search and correct again "
                        "at --levels-if-missed, then at 32 linear levels (--fine-if-missed), until one meets it; "
                        "else keep the most accurate", _more_levels),
]


def run_passes(c: Conversion, stop_before: str | None = None, start: str | None = None) -> Conversion:
    """Run the passes of :data:`PIPELINE` in order, from ``start`` (default the first) up to, not including,
    ``stop_before``."""
    names = [p.name for p in PIPELINE]
    for p in PIPELINE[names.index(start) if start else 0:]:
        if p.name == stop_before:
            break
        p.run(c)
    return c


def build_graph(model, data: Dataset, cfg: ConvertConfig, quiet: bool = False) -> Graph:
    """capture → fold_batchnorm → insert_sfn → calibrate, with λ = 1 everywhere (what every method starts from)."""
    return run_passes(Conversion(model, data, cfg, quiet=quiet), stop_before="scale").captured()


def convert(model, data: Dataset, config: ConvertConfig | None = None, *, source: dict | None = None,
            quiet: bool = True, val_data: Dataset | None = None, warn: Callable[[str], None] | None = None,
            validate: bool = False, **overrides) -> ConvertedModel:
    """Convert a model (ExportedProgram or nn.Module) into a calibrated single-timestep SFN network,
    or with ``method`` (if, mtn, ecmt, pmsm, mbe) into one of the baselines of docs/methods.md.

    λ: ``scale`` fixes it; otherwise it is searched (``tune``), choosing the most accurate
    configuration, or with ``max_drop`` the lowest-energy one within that many points of the ANN.
    The search validates on ``val_data`` when given (calibration then uses all of ``data``), else on images
    of ``data`` (``val_size``, ``val_fraction``: :meth:`Dataset.validation_split`). ``warn`` receives a line
    when the validation set cannot resolve ``max_drop`` (:func:`sfn_deploy.evaluation.budget_warning`),
    just before the search. ``validate``: also measure the result on the validation images (the model's
    ``validation`` and its metrics), from bias correction's own passes when its check ran them.
    """
    cfg = config or load_config("", overrides)
    if val_data is not None:
        data = data.with_validation(val_data)
    t0 = time.time()
    c = run_passes(Conversion(model, data, cfg, source or {}, quiet, warn))
    return finish(c, t0, validate)


def finish(c: Conversion, t0: float, validate: bool = False) -> ConvertedModel:
    """The converted model of what the passes left (:func:`convert`; ``tune -o`` after its own search)."""
    cfg, data = c.config, c.data
    search = c.applied.search
    if (search.get("levels", cfg.levels), search.get("fire", cfg.fire)) != (cfg.levels, cfg.fire):
        cfg = replace(cfg, levels=search["levels"], fire=search.get("fire", cfg.fire))  # a later try was kept
    converted = ConvertedModel(c.captured(), data.sample_shape, cfg.to_dict(), c.source, {},
                               c.applied.search, data.preprocessing, data.classes)
    calib = data.limit(cfg.calib_limit)
    converted.metrics = {"convert_seconds": round(time.time() - t0, 3), "calibration_samples": len(calib),
                         "input_abs_max": c.input_abs_max,     # input: fixed-point encoding (Lava)
                         **c.applied.metrics}
    if validate:
        _validate(converted, c)
    return converted


def _validate(converted: ConvertedModel, c: Conversion) -> None:
    cfg = c.config
    val, record = c.data.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)
    if c.checked is not None:      # the check ran the SNN (counting) and the ANN over these images already
        result = from_passes(cfg.fidelity, val, c.checked.snn, c.checked.ann, c.checked.counter)
    else:
        result = evaluate(converted, val, batch_size=cfg.batch_size, quiet=c.quiet)
    converted.validation = result
    converted.metrics.update(accuracy=result.accuracy, ann_accuracy=result.ann_accuracy, agreement=result.agreement,
                             energy_ratio=result.energy_ratio, ac_snn=result.ac_snn, mac_snn=result.mac_snn,
                             mac_ann=result.mac_ann, samples=result.samples,
                             drop=result.drop.to_dict() if result.drop else None, validation=record.to_dict(),
                             fidelity=cfg.fidelity, cosine=result.cosine, relative_error=result.relative_error)
