"""The staged λ search (``--strategy staged``, the default of ``--search per-block`` and ``per-site``).

The plain search (``--strategy tpe``, the paper's, the default of ``--search shared``) gives Optuna's TPE sampler
the whole space from a start grid and scores every trial on every validation image. The staged search spends the
same trials so that it never chooses a point that a shared λ it evaluated dominates, and scores poor points on
few images:

1. **Shared grid** (stage ``grid``): one λ for every site, :data:`GRID` (0.05 … 0.8, ratio √2), middle first.
2. **Refinement** (``refine``): bisection in log λ between the best shared point and the next evaluated λ
   above it (with ``max_drop``: the cheapest shared point within budget; without: the most accurate one, on both
   sides), until the two are less than :data:`REFINE_RATIO` apart or :data:`REFINE_STEPS` points were added.
3. **Per group** (several λ groups only): the best shared point is enqueued as the warm start (``warm``; its
   numbers are copied from the shared trial, nothing is re-run); from it, a pattern search (:func:`_pattern`):
   each round probes every group's λ × step (``probe``; step :data:`PROBE` = 1.3 at first, coarser steps are
   cheaper), then the combination of the probes that stayed within budget and saved energy (``combine``); the
   cheapest point within budget becomes the next centre, and when no point beats the centre the step shrinks
   to its square root, down to :data:`STEP_MIN`. Every planned point is enqueued (``enqueue_trial``).
4. **Sampler**: the trials left after the plan are Optuna's TPE sampler's (univariate, seeded), which sees all
   earlier trials.

The trials form one single-objective Optuna study (minimise :func:`score`: the energy ratio of a point within
budget, else 10 + its shortfall in points), so Optuna's pruning applies: each trial runs on growing prefixes of
one seeded permutation of the validation images (:func:`rungs`: 250, 500, 1,000, 2,000 for 2,000 images),
reports after each, and :class:`RungPruner` stops it when the paired 95 % interval of its drop lies wholly above
the budget (it cannot be within budget; while the most accurate point so far is outside the budget, above that
point's drop instead, so that the most accurate points still run on every image) or, outside the shared stages,
when its energy ratio exceeds the cheapest point within budget so far by more than :data:`ENERGY_SLACK` (it
cannot be chosen). A pruned trial counts as one of the ``--trials``; only the trials run on every image are
candidates. Without ``max_drop`` the budget is the accuracy of the most accurate shared point. While no point
run on every image is within ``max_drop`` of the ANN, the budget is the accuracy of the most accurate point less
the half-width of that point's paired interval (at most ``max_drop``): the budget cannot be met, and among the
points the validation images cannot tell from the most accurate one the search takes the cheapest, rather than
the most accurate one on noise.

**Choosing** (:func:`select`): the candidates are the points run on every image that are within budget (without
``max_drop``: at least as accurate as the most accurate shared point) and that no shared point run on every
image dominates (as accurate or more, and as cheap or cheaper), a shared point that failed its own neighbour
check excepted; by energy ratio, each is checked at its neighbours, every λ × (1 + :data:`NEIGHBOUR`) and
× (1 − :data:`NEIGHBOUR`), which must be within budget too (without ``max_drop``: lose at most
:data:`NEIGHBOUR_SLACK` points against the candidate). The first candidate that passes is chosen; after
:data:`MAX_CANDIDATES` failures the shared λ left among the candidates are checked the same way, cheapest first
(:data:`MAX_SHARED_FALLBACK` at most: a point one shared λ can reach and hold is a safer choice than one that
failed); if none holds, the checked candidate whose worse neighbour is the most accurate is taken, and the rule
says so. Neighbour checks are not trials of the study (a rerun repeats them: two evaluations per
candidate checked, stopped early when a neighbour is clearly outside the budget).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from . import bias_correction
from .evaluation import tango_interval
from .fidelity import Reference, interval_from_moments
from .ir import Graph
from .simulators.counting import OpCounter
from .simulators.interpreter import run

GRID = tuple(round(0.05 * 2 ** (k / 2), 4) for k in range(9))      # 0.05, 0.0707, 0.1, … 0.5657, 0.8
GRID_ORDER = tuple(sorted(GRID, key=lambda v: (abs(math.log(v / 0.2)), v)))   # 0.2 first, then outwards
REFINE_RATIO = 1.045        # stop bisecting when the bracket is narrower than this ratio (2^(1/16) ≈ 1.044)
REFINE_STEPS = 4            # at most this many refinement points
PROBE = 1.3                 # a probe multiplies one group's λ by this (coarser steps: cheaper) at first
STEP_MIN = 1.06             # the pattern search ends when its step would be smaller than this
MAX_ROUNDS = 12             # pattern-search rounds at most
NEIGHBOUR = 0.03            # the chosen point must hold at λ × (1 ± NEIGHBOUR)
NEIGHBOUR_SLACK = 0.5       # without a budget: points a neighbour may lose against the candidate
MAX_CANDIDATES = 4          # candidates checked at their neighbours before the shared λ are tried
MAX_SHARED_FALLBACK = 3     # then shared λ checked at their neighbours before giving up
ENERGY_SLACK = 0.02         # prune a trial whose energy ratio exceeds the incumbent's by more than this share
MIN_RUNG = 100              # images of the smallest rung
MAX_RUNGS = 4
LAM_RANGE = (0.02, 1.0)     # the search space of every group (log scale)
INFEASIBLE = 10.0           # score of a point outside the budget: INFEASIBLE + its shortfall in points


def rungs(n: int) -> list[int]:
    """Image counts at which a trial reports: n, n/2, n/4, … down to MIN_RUNG, at most MAX_RUNGS of them."""
    out = [n]
    while len(out) < MAX_RUNGS and out[0] // 2 >= MIN_RUNG:
        out.insert(0, out[0] // 2)
    return out


def score(accuracy: float, energy: float, target: float) -> float:
    """What the study minimises: the energy ratio within budget (accuracy ≥ target), else INFEASIBLE + shortfall."""
    return energy if accuracy >= target - 1e-9 else INFEASIBLE + (target - accuracy)


# the figures of a rung that a trial records (user attributes) and a copy of it repeats
RUNG_FIGURES = ("images", "accuracy", "ann_only", "snn_only", "diff_sum", "diff_squares")


@dataclass
class Rung:
    """One trial's figures on the first ``images`` validation images of the permutation.

    "Accuracy" is 100 × the mean per-sample score (:mod:`sfn_deploy.fidelity`): top-1 accuracy, or with output
    fidelity the outputs' cosine similarity. Accuracy keeps the discordant counts (Tango's interval); output
    fidelity the sum and sum of squares of the per-sample differences ANN − SNN in points (normal interval)."""
    images: int
    accuracy: float             # SNN, %
    ann_accuracy: float         # ANN on the same images, %
    ann_only: int | None        # images only the ANN gets right (accuracy)
    snn_only: int | None
    energy: float               # energy ratio (eq. 43)
    diff_sum: float | None = None       # output fidelity: Σ 100·(ANN − SNN score)
    diff_squares: float | None = None   # and the sum of its squares

    def drop_low(self) -> float:
        """Lower limit (points) of the paired 95 % interval of the drop on these images."""
        return drop_interval(self.__dict__, self.images)[0]


def drop_interval(figures: dict, n: int) -> tuple[float, float]:
    """The paired 95 % interval (points) of the drop that a rung's figures (or a trial's attributes) give."""
    if figures.get("ann_only") is not None:
        low, high = tango_interval(figures["ann_only"], figures["snn_only"], n)
        return 100.0 * low, 100.0 * high
    return interval_from_moments(figures["diff_sum"], figures["diff_squares"], n)


class Evaluator:
    """Runs the SNN at given λ on growing prefixes of a seeded permutation of the validation images."""

    def __init__(self, graph: Graph, x: torch.Tensor, ref: Reference, batch_size: int,
                 energy: tuple[float, float], seed: int = 0, correct: torch.Tensor | None = None):
        perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))
        self.graph, self.x, self.ref = graph, x[perm], ref.subset(perm)
        self.correct = correct          # the bias correction's images: each point scored corrected
        self.batch_size, self.energy = batch_size, energy
        self.rungs = rungs(len(ref))
        self.images = 0                 # images run so far, all trials and checks together (the search's cost)

    @property
    def n(self) -> int:
        return len(self.ref)

    def run(self, lam: dict[str, float]) -> Iterator[Rung]:
        """The figures at each rung; the caller stops iterating to prune."""
        bias_correction.scaled(self.graph, lam, self.correct)
        counter = OpCounter(self.graph, True)
        scores: list[torch.Tensor] = []
        start = 0
        for stop in self.rungs:
            for i in range(start, stop, self.batch_size):
                j = min(i + self.batch_size, stop)
                counter.start_batch(j - i)
                scores.append(self.ref.scores(run(self.graph, self.x[i:j], spiking=True, hook=counter), i))
                self.images += j - i
            start = stop
            snn, ann = torch.cat(scores), self.ref.ann[:stop]
            rung = Rung(images=stop, accuracy=100.0 * float(snn.mean()), ann_accuracy=100.0 * float(ann.mean()),
                        ann_only=None, snn_only=None, energy=counter.result().energy_ratio(*self.energy))
            if self.ref.binary:
                a, s = ann > 0.5, snn > 0.5
                rung.ann_only, rung.snn_only = int((a & ~s).sum()), int((s & ~a).sum())
            else:
                d = 100.0 * (ann - snn).double()
                rung.diff_sum, rung.diff_squares = float(d.sum()), float((d * d).sum())
            yield rung

    def full(self, lam: dict[str, float], stop: Callable[[Rung], bool] | None = None) -> Rung:
        """The last rung reached: all images, or the first rung at which ``stop`` says to give up."""
        last = None
        for last in self.run(lam):
            if stop is not None and last.images < self.n and stop(last):
                break
        assert last is not None
        return last


@dataclass
class Context:
    """What the pruner and the planner know about the study: the budget, and the points run on every image."""
    ann_accuracy: float                 # ANN on all validation images, %
    max_drop: float | None
    n: int                              # validation images
    groups: list[str]
    target: float = -math.inf           # accuracy a point must reach (%)
    incumbent: float | None = None      # energy ratio of the cheapest point within budget so far
    best: float = -math.inf             # accuracy of the most accurate point run on every image (%)
    relaxed: bool = False               # no point within max_drop of the ANN: the target is below the best point
    shared: dict[float, dict] = field(default_factory=dict)   # λ → record, shared points run on every image

    def update(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        """Recompute the target and the incumbent from the study's finished trials."""
        full = [t for t in trials if _full(t, self.n)]
        self.shared = {}
        for t in full:
            v = shared_value(lams(t), self.groups)
            if v is not None and t.user_attrs.get("stage") != "warm":
                self.shared[v] = t.user_attrs
        top = max(full, key=lambda t: t.user_attrs["accuracy"], default=None)
        self.best = -math.inf if top is None else top.user_attrs["accuracy"]
        self.relaxed = False
        if self.max_drop is None:
            self.target = max((r["accuracy"] for r in self.shared.values()), default=-math.inf)
        elif top is None or self.best >= self.ann_accuracy - self.max_drop - 1e-9:
            self.target = self.ann_accuracy - self.max_drop
        else:                # nothing within budget: what the validation images cannot tell from the most accurate
            low, high = drop_interval(top.user_attrs, self.n)
            self.target, self.relaxed = self.best - min(self.max_drop, 0.5 * (high - low)), True
        ok = [t.user_attrs["energy_ratio"] for t in full if t.user_attrs["accuracy"] >= self.target - 1e-9]
        self.incumbent = min(ok, default=None)

    def feasible(self, accuracy: float) -> bool:
        return accuracy >= self.target - 1e-9

    @property
    def drop_allowed(self) -> float:
        """The drop (points) beyond which a trial is pruned: the budget's, or when the most accurate point so far
        is outside it, that point's (so that the most accurate points are still run on every image); infinite
        before any point was."""
        return self.ann_accuracy - min(self.target, self.best)


class RungPruner(optuna.pruners.BasePruner):
    """Optuna pruner of the staged search: reads the rung a trial just reported (user attribute ``rung``).

    Prunes when the paired 95 % interval of the drop on the images run so far lies wholly above the drop the
    budget allows, or (outside the shared stages) when the energy ratio so far exceeds the incumbent's by more
    than ENERGY_SLACK."""

    def __init__(self, context: Context):
        self.context = context

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        r = trial.user_attrs.get("rung")
        if not r or r["images"] >= self.context.n:
            return False
        return prune_reason(Rung(**r), self.context, trial.user_attrs.get("stage", "tpe")) is not None


def prune_reason(r: Rung, c: Context, stage: str) -> str | None:
    if math.isfinite(c.drop_allowed) and r.drop_low() > c.drop_allowed + 1e-9:
        return "accuracy"
    if stage not in ("grid", "refine") and c.incumbent is not None and r.energy > c.incumbent * (1 + ENERGY_SLACK):
        return "energy"
    return None


def lams(t: optuna.trial.FrozenTrial) -> dict[str, float]:
    """A trial's λ per group (a waiting trial's from its enqueued parameters)."""
    params = t.params or t.system_attrs.get("fixed_params", {})
    return {k[len("lam:"):]: float(v) for k, v in params.items() if k.startswith("lam:")}


def shared_value(lam: dict[str, float], groups: list[str]) -> float | None:
    """The common λ when every group has the same one, else None."""
    values = [lam.get(g) for g in groups]
    if not values or values[0] is None or any(v is None or not math.isclose(v, values[0], rel_tol=1e-9)
                                              for v in values):
        return None
    return values[0]


def _full(t: optuna.trial.FrozenTrial, n: int) -> bool:
    return t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("images") == n


def _alive(t: optuna.trial.FrozenTrial) -> bool:
    return t.state != optuna.trial.TrialState.FAIL and not (
        t.state == optuna.trial.TrialState.PRUNED and "images" not in t.user_attrs)   # a surplus trial


class _History:
    """The study's trials (failed and surplus ones left out) indexed by their λ per group."""

    def __init__(self, trials: list[optuna.trial.FrozenTrial], c: Context):
        self.c = c
        self.alive = [t for t in trials if _alive(t)]
        self.by_key: dict[tuple[float, ...], list[optuna.trial.FrozenTrial]] = {}
        for t in self.alive:
            self.by_key.setdefault(self.key(lams(t)), []).append(t)

    def key(self, lam: dict[str, float]) -> tuple[float, ...]:
        return tuple(float(f"{lam.get(g, -1.0):.9g}") for g in self.c.groups)

    def known(self, lam: dict[str, float]) -> bool:
        return self.key(lam) in self.by_key

    def pending(self, lam: dict[str, float]) -> bool:
        """Only waiting or running trials hold this point so far."""
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return not any(t.state in done for t in self.by_key.get(self.key(lam), []))

    def energy(self, lam: dict[str, float]) -> float | None:
        """The energy ratio of this point run on every image and within budget, else None."""
        for t in self.by_key.get(self.key(lam), []):
            if _full(t, self.c.n) and self.c.feasible(t.user_attrs["accuracy"]):
                return float(t.user_attrs["energy_ratio"])
        return None


_WAIT: tuple[dict[str, float], str] = ({}, "wait")     # the plan's next point depends on running trials


def plan(trials: list[optuna.trial.FrozenTrial], c: Context) -> tuple[dict[str, float], str] | None:
    """The next point to enqueue and its stage, or None (the sampler's turn: the plan is done, or it waits for
    running trials). A function of the study's trials alone, so every worker and every rerun agree."""
    h = _History(trials, c)
    groups = c.groups

    def point(v: float) -> dict[str, float]:
        return {g: v for g in groups}

    for g_v in GRID_ORDER:
        if not h.known(point(g_v)):
            return point(g_v), "grid"
    if any(t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING) for t in h.alive):
        return None
    c.update(trials)
    refined = sum(1 for t in h.alive if t.user_attrs.get("stage") == "refine")
    best = best_shared(trials, c)
    if best is not None and refined < REFINE_STEPS:
        mid = _bisect(best, trials, c)
        if mid is not None and not h.known(point(mid)):
            return point(mid), "refine"
    if len(groups) < 2 or best is None:
        return None
    if not any(t.user_attrs.get("stage") == "warm" for t in h.alive):
        return point(best), "warm"
    if h.energy(point(best)) is None:        # no shared point within budget: the sampler looks for accuracy
        return None
    step = _pattern(h, point(best))
    return None if step is None or step is _WAIT else step


def _pattern(h: _History, centre: dict[str, float]) -> tuple[dict[str, float], str] | None:
    """Pattern search from the warm start, replayed from the study's trials: each round probes every group's λ
    × step from the centre (a group whose probe broke the budget is not probed again at this step), then,
    when two or more probes were cheaper and within budget, their combination. The cheapest point within budget
    becomes the next centre; when none is cheaper than the centre, the step shrinks to its square root, down to
    STEP_MIN. None when done; _WAIT while the next point depends on running trials."""
    step, blocked = PROBE, set()
    for _ in range(MAX_ROUNDS):
        e0 = h.energy(centre)
        assert e0 is not None
        probes = {g: {**centre, g: min(LAM_RANGE[1], centre[g] * step)} for g in h.c.groups if g not in blocked}
        probes = {g: p for g, p in probes.items() if p[g] > centre[g] * (1 + 1e-9)}
        for p in probes.values():
            if not h.known(p):
                return p, "probe"
        if any(h.pending(p) for p in probes.values()):
            return _WAIT
        good = {g: p for g, p in probes.items() if (h.energy(p) or math.inf) < e0}
        blocked |= {g for g, p in probes.items() if h.energy(p) is None}
        tried = list(probes.values())
        if len(good) >= 2:
            comb = {**centre, **{g: p[g] for g, p in good.items()}}
            if not h.known(comb):
                return comb, "combine"
            if h.pending(comb):
                return _WAIT
            tried.append(comb)
        new = min(tried, key=lambda p: h.energy(p) or math.inf, default=centre)
        if (h.energy(new) or math.inf) < e0:
            centre = new
            continue
        step, blocked = math.sqrt(step), set()
        if step < STEP_MIN:
            return None
    return None


def best_shared(trials: list[optuna.trial.FrozenTrial], c: Context) -> float | None:
    """The best shared λ run on every image: the cheapest within budget; without one (or none within it), the
    most accurate (ties: the cheaper)."""
    if not c.shared:
        return None
    ok = [v for v, r in c.shared.items() if c.max_drop is not None and c.feasible(r["accuracy"])]
    if ok:
        return min(ok, key=lambda v: (c.shared[v]["energy_ratio"], -v))
    return max(c.shared, key=lambda v: (c.shared[v]["accuracy"], -c.shared[v]["energy_ratio"]))


def _bisect(best: float, trials: list[optuna.trial.FrozenTrial], c: Context) -> float | None:
    """The geometric midpoint between ``best`` and its nearest evaluated shared λ above (and, without a budget or
    when ``best`` is outside it, below), on the side of the wider gap; None when the gaps are narrower than
    REFINE_RATIO."""
    evaluated = sorted({v for t in trials if _alive(t) for v in [shared_value(lams(t), c.groups)] if v is not None})
    above = min((v for v in evaluated if v > best * (1 + 1e-9)), default=LAM_RANGE[1])
    sides = [(above / best, math.sqrt(above * best))] if above > best * (1 + 1e-9) else []
    if not c.feasible(c.shared[best]["accuracy"]) or c.max_drop is None:
        below = max((v for v in evaluated if v < best * (1 - 1e-9)), default=None)
        if below is not None:
            sides.append((best / below, math.sqrt(below * best)))
    sides = [s for s in sides if s[0] > REFINE_RATIO]
    if not sides:
        return None
    return round(max(sides, key=lambda s: s[0])[1], 6)


# ---- choosing the point --------------------------------------------------------------------------------------

@dataclass
class Candidate:
    trial: int
    accuracy: float
    energy_ratio: float
    lam: dict[str, float]           # per site
    shared: bool


@dataclass
class Check:
    """A candidate's neighbour: every λ × factor."""
    trial: int
    factor: float
    accuracy: float
    energy_ratio: float
    images: int
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "factor": self.factor, "accuracy": self.accuracy,
                "energy_ratio": self.energy_ratio, "images": self.images, "ok": self.ok}


def dominated(p: Candidate, shared: list[Candidate]) -> bool:
    """Some other shared point is as accurate or more and as cheap or cheaper."""
    return any(s.trial != p.trial and s.accuracy >= p.accuracy - 1e-9 and s.energy_ratio <= p.energy_ratio + 1e-12
               for s in shared)


def candidates(points: list[Candidate], c: Context, failed: frozenset[int] = frozenset()) -> list[Candidate]:
    """Within budget, not dominated by a shared point (other than one that ``failed`` its neighbour check),
    not failed themselves; cheapest first (ties: more accurate, then shared)."""
    shared = [p for p in points if p.shared and p.trial not in failed]
    ok = [p for p in points if c.feasible(p.accuracy) and p.trial not in failed and not dominated(p, shared)]
    return sorted(ok, key=lambda p: (p.energy_ratio, -p.accuracy, not p.shared, p.trial))


def _neighbours(p: Candidate, floor: float, n: int, evaluate: Callable[[dict[str, float], float], Rung]
                ) -> tuple[list[Check], float]:
    """Run p's two neighbours (the second only when the first holds): the checks, and the worse accuracy."""
    checks, worst = [], math.inf
    for factor in (1 + NEIGHBOUR, 1 - NEIGHBOUR):
        r = evaluate({s: min(LAM_RANGE[1], v * factor) for s, v in p.lam.items()}, floor)
        ok = r.images == n and r.accuracy >= floor - 1e-9
        checks.append(Check(p.trial, factor, r.accuracy, r.energy, r.images, ok))
        worst = min(worst, r.accuracy if r.images == n else -math.inf)
        if not ok:
            break
    return checks, worst


def select(points: list[Candidate], c: Context, evaluate: Callable[[dict[str, float], float], Rung]
           ) -> tuple[Candidate | None, str, list[Check]]:
    """The chosen candidate, the rule that chose it, and the neighbour checks run (see the module docstring).

    ``evaluate(lam, floor)`` runs the SNN at λ per site and may stop early once the accuracy is surely below
    ``floor``. A candidate that fails its check no longer excludes the points it dominates. None when no
    point is within budget (the caller takes the most accurate)."""
    checks: list[Check] = []
    tried: list[tuple[float, Candidate]] = []
    failed: frozenset[int] = frozenset()
    while len(tried) < MAX_CANDIDATES:
        left = candidates(points, c, failed)
        if not left:
            break
        p = left[0]
        floor = c.target if c.max_drop is not None else p.accuracy - NEIGHBOUR_SLACK
        mine, worst = _neighbours(p, floor, c.n, evaluate)
        checks += mine
        if mine[-1].ok:
            budget = ("as accurate as the best shared λ" if c.max_drop is None else
                      f"within {c.max_drop:g} points" if not c.relaxed else
                      f"within {c.best - c.target:.2f} points of the most accurate point ({c.best:.2f} %; none is "
                      f"within {c.max_drop:g} points of the ANN)")
            return p, (f"lowest energy {budget}, held at λ × (1 ± {NEIGHBOUR:g})"
                       + ("" if not tried else f"; {len(tried)} cheaper point(s) failed at a neighbour")), checks
        tried.append((worst, p))
        failed |= {p.trial}
    if not tried:
        return None, "", checks
    # the cheapest candidates all failed: the shared λ left, cheapest first, which a search never does worse than
    for p in [q for q in candidates(points, c, failed) if q.shared][:MAX_SHARED_FALLBACK]:
        mine, worst = _neighbours(p, c.target if c.max_drop is not None else p.accuracy - NEIGHBOUR_SLACK, c.n,
                                  evaluate)
        checks += mine
        if mine[-1].ok:
            return p, (f"the cheapest shared λ that held at λ × (1 ± {NEIGHBOUR:g}); {len(tried)} cheaper point(s) "
                       "failed at a neighbour"), checks
        tried.append((worst, p))
    worst, p = max(tried, key=lambda w: (w[0], -w[1].energy_ratio))
    return p, (f"no candidate held at λ × (1 ± {NEIGHBOUR:g}) ({len(tried)} checked); the one with the most "
               "accurate neighbour taken"), checks
