"""λ search with Optuna: accuracy and energy ratio together, Pareto front kept.

The study is an ordinary Optuna study, so any Optuna storage works: a SQLite file
resumes an interrupted search (completed trials are kept, the rerun only runs the
missing ones), and a shared database (PostgreSQL, MySQL) lets several machines work
on one study. ``--trials N`` means N completed trials in the study, however many
workers run: a trial that would exceed N is pruned before it evaluates anything
(the lowest-numbered running trials win).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import optuna

from .config import ConvertConfig
from .data import Dataset
from .errors import UserError
from .ir import Graph
from .passes import set_scale
from .progress import progress

SHARED_GRID = [0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0]


def site_groups(graph: Graph, search: str) -> dict[str, list[str]]:
    """Which sites share one λ. Post-softmax sites are λ-independent and not searched."""
    sites = [s for s in graph.sites if s.attrs["kind"] != "softmax"]
    if search == "shared":
        return {"all": [s.name for s in sites]}
    if search == "per-site":
        return {s.name: [s.name] for s in sites}
    groups: dict[str, list[str]] = {}
    for s in sites:
        path = s.source.split(",")[0].split(" ")[0]
        parts = path.split(".")
        key = ".".join(parts[:2]) if len(parts) >= 2 and parts[1].isdigit() else s.name
        groups.setdefault(key, []).append(s.name)
    return groups


def study_name(source: dict, cfg: ConvertConfig) -> str:
    keys = ("levels", "fire", "rounding", "percentile", "search", "val_fraction", "seed", "calib_limit")
    blob = json.dumps({"source": source, **{k: getattr(cfg, k) for k in keys}}, sort_keys=True, default=str)
    return "sfn-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def _storage(url: str | None):
    if url is None:
        return optuna.storages.InMemoryStorage()
    if "://" not in url:                      # a plain path means a SQLite file
        url = "sqlite:///" + os.path.abspath(url)
    try:
        if url.startswith("sqlite"):
            return _sqlite_storage(url)
        return optuna.storages.RDBStorage(url)
    except Exception as e:
        raise UserError(f"--storage {url}: cannot open Optuna storage ({type(e).__name__}: {e})")


def _sqlite_storage(url: str, attempts: int = 5):
    """An RDBStorage whose transactions take SQLite's write lock at BEGIN.

    SQLite ignores SELECT ... FOR UPDATE, so two workers could both read an enqueued trial as
    WAITING and both run it; BEGIN IMMEDIATE serialises those read-then-write transactions.
    Workers starting together may also race to create the schema: the loser retries.
    """
    from sqlalchemy import event

    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            break
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))

    @event.listens_for(storage.engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None     # let the "begin" hook below issue BEGIN

    @event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()                  # pooled connections were opened before the hooks
    return storage


def _completed(study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run_search(graph: Graph, data: Dataset, cfg: ConvertConfig, source: dict, quiet: bool = True) -> dict:
    """Run (or continue) the study until it holds ``cfg.trials`` completed trials; return its Pareto front."""
    from .convert import accuracy, energy_constants, measure

    val, _ = data.split(cfg.val_fraction, cfg.seed)
    ann_pred, _ = measure(graph, val, cfg.batch_size, spiking=False)
    ann_acc = accuracy(ann_pred, val.y)
    e_ac, e_mac = energy_constants()
    groups = site_groups(graph, cfg.search)
    name = cfg.study or study_name(source, cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(cfg.storage)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                    directions=["maximize", "minimize"])
        created = True
    except optuna.exceptions.DuplicatedStudyError:   # resuming, or another worker made it
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    if study.user_attrs.get("groups") not in (None, groups):
        raise UserError(f"study {name!r} was made for other λ groups; choose another --study")
    if created:                               # only the creator enqueues the start grid
        study.set_user_attr("groups", groups)
        study.set_user_attr("ann_accuracy", ann_acc)
        study.set_user_attr("val_samples", len(val))
        for v in SHARED_GRID:
            study.enqueue_trial({f"lam:{g}": v for g in groups})

    def objective(trial: optuna.Trial):
        ahead = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                 if t.number < trial.number]
        if _completed(study) + len(ahead) >= cfg.trials:
            raise optuna.TrialPruned("the study already has the requested number of trials")
        lam = {g: trial.suggest_float(f"lam:{g}", 0.02, 1.0, log=True) for g in groups}
        per_site = {s: lam[g] for g, members in groups.items() for s in members}
        set_scale(graph, per_site)
        pred, counter = measure(graph, val, cfg.batch_size)
        acc = accuracy(pred, val.y)
        ratio = counter.result().energy_ratio(e_ac, e_mac)
        trial.set_user_attr("lam", per_site)
        return acc, ratio

    done = _completed(study)
    bar = progress(None, "λ search", quiet=quiet, total=cfg.trials)
    bar.update(done)

    def stop_when_full(study, trial):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.update(1)
        if _completed(study) >= cfg.trials:
            study.stop()

    if done < cfg.trials:
        study.optimize(objective, callbacks=[stop_when_full], catch=())
    bar.close()
    front = sorted(({"trial": t.number, "accuracy": t.values[0], "energy_ratio": t.values[1],
                     "lam": t.user_attrs["lam"]} for t in study.best_trials),
                   key=lambda r: (r["energy_ratio"], -r["accuracy"]))
    return {"study": name, "storage": cfg.storage or "memory", "trials_completed": _completed(study),
            "ann_accuracy": study.user_attrs.get("ann_accuracy", ann_acc), "val_samples": len(val),
            "groups": {g: len(m) for g, m in groups.items()}, "pareto_front": front}


def choose(result: dict, max_drop: float | None) -> dict:
    """Most accurate point (ties: cheaper); with a budget, the cheapest point within max_drop points."""
    front = result["pareto_front"]
    if not front:
        raise UserError("the λ search finished no trial")
    best = max(front, key=lambda r: (r["accuracy"], -r["energy_ratio"]))
    if max_drop is None:
        return {**best, "rule": "max accuracy"}
    ok = [r for r in front if r["accuracy"] >= result["ann_accuracy"] - max_drop]
    if not ok:
        return {**best, "rule": f"no configuration within {max_drop} points; most accurate taken"}
    return {**min(ok, key=lambda r: r["energy_ratio"]), "rule": f"lowest energy within {max_drop} points"}
