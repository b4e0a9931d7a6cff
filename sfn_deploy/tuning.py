"""λ search with Optuna: accuracy and energy ratio together, Pareto front kept.

The study is an ordinary Optuna study, so any Optuna storage works: a SQLite file
resumes an interrupted search (completed trials are kept, the rerun only runs the
missing ones), and a shared database (PostgreSQL, MySQL: an RDB URL) or an Optuna
journal file on a shared file system (a plain ``--storage`` path ending in
``.journal``; Optuna's JournalFileBackend with its JournalFileOpenLock, which works on
NFS v3 and later) lets several machines work on one study (docs/cli.md, "Many
workers, many machines"). ``--trials N`` means N completed trials in the study,
however many workers run. A worker starts a trial only while the completed trials plus the running
trials of live workers are fewer than N; otherwise it waits (polling, at most every
2 s) until those trials end or their workers are found dead. Two workers that start
trials at the same moment are told apart by trial number: the lower-numbered running
trials win, and a trial that would exceed N is pruned before it evaluates anything.
A worker whose trials are pruned (or taken over, below) more than max(5, N) times
gives up with a UserError, so no worker can flood the study with pruned trials.

Dead workers: a worker on a database or journal storage records a heartbeat for its
running trial every ``HEARTBEAT_INTERVAL`` seconds (Optuna's RDBStorage heartbeat; on
a journal, which has none in Optuna, this module's own: :class:`_JournalStorage`) and
marks the trial with a user attribute ``worker`` (a hash of the boot id and process
namespace, its pid, the trial number). A running trial counts as dead, and is set to
FAIL by whichever worker sees it first, when

* its heartbeat is older than ``GRACE_PERIOD`` seconds (Optuna's own
  ``fail_stale_trials``, which ``study.optimize`` also runs before each trial): by
  the database's clock, or, on a journal, which has no clock, when the heartbeat has
  not changed for ``GRACE_PERIOD`` seconds since this worker first saw it (so a worker
  started after another one died waits out the grace period once);
* its mark names a process of this machine's process namespace that no longer runs
  (Linux only: a rerun right after ``kill -9`` takes over at once instead of
  waiting out the grace period);
* it has no mark (a worker killed between creating the trial and its first
  heartbeat, or a trial left by a version without heartbeats) and started more than
  ``GRACE_PERIOD`` seconds ago by this machine's clock.

A dead trial's parameters are queued again (Optuna's
``RetryHeartbeatStaleTrialCallback``, at most ``MAX_RETRY`` times), so an enqueued
start point is not lost. A live worker whose trial another worker declared dead (it
was suspended longer than the grace period) drops that trial and goes on. A worker
waits as long as a running trial's heartbeat is fresh: a hung worker whose heartbeat
thread still runs holds back the end of the search until it is killed. An in-memory study has one
worker and no heartbeat. Ctrl-C fails the running trial (Optuna sets it to FAIL; a
rerun runs a new trial in its place) and propagates KeyboardInterrupt. Storage errors
(a missing folder, a file that is not SQLite or not a journal, a damaged journal, a
read-only database, an unreachable server, a trial whose recorded figures this module
never writes) are UserErrors of one line naming the storage, with a password in a URL hidden.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat  # private, but what Optuna's heartbeat machinery checks for
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from . import bias_correction, evaluation, fidelity, staged
from .config import JOURNAL_SUFFIX, ConvertConfig, journal_path, redacted, storage_path
from .data import Dataset, Validation
from .errors import UserError
from .ir import Graph
from .methods import Applied
from .passes import set_scale
from .progress import progress
from .results import Result, optional

HEARTBEAT_INTERVAL = 10     # s between heartbeats of a running trial (one small write each)
GRACE_PERIOD = 30           # s without a heartbeat before a running trial is declared dead
MAX_RETRY = 2               # times a dead trial's parameters are queued again

SHARED_GRID = [0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0]



@dataclass
class ParetoPoint(Result):
    """A completed trial on the Pareto front: validation accuracy (%), the paper's energy ratio, λ per site."""
    trial: int
    accuracy: float
    energy_ratio: float
    lam: dict[str, float]


@dataclass
class Chosen(ParetoPoint):
    """The point the search settled on, and the rule that picked it."""
    rule: str = ""


@dataclass
class SearchResult(Result):
    """The λ search (an Optuna study): how many trials it ran, the ANN's validation accuracy (%), the front."""
    study: str
    storage: str                        # the storage URL with any password redacted, or "memory"
    trials_completed: int
    ann_accuracy: float
    val_samples: int
    groups: dict[str, int]              # λ groups and the number of sites in each
    pareto_front: list[ParetoPoint]     # by energy ratio, then accuracy
    chosen: Chosen | None = optional()
    validation: Validation | None = optional()   # which images scored the trials (this worker's choice)
    strategy: str | None = optional()            # "staged" (the plain TPE study leaves it out)
    max_drop: float | None = optional()          # the budget the choice was made for
    checks: list[dict] | None = optional()       # the neighbour checks of the candidates (staged.Check)
    images: int | None = optional()              # validation images this worker ran (trials and checks)


def strategy_of(cfg: ConvertConfig) -> str:
    """The search strategy: the configured one, else tpe for a shared λ and staged for per-block and per-site."""
    return cfg.strategy or ("tpe" if cfg.search == "shared" else "staged")

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


def study_name(source: dict, cfg: ConvertConfig, val_data: Dataset | None = None) -> str:
    """A hash of the model and the options that change the objective, the validation images among them.

    With ``val_fraction`` the name is the one earlier versions gave; with the count rule it names
    ``val_size`` instead, and a separate validation set (``--val-data``) by a hash of its contents. A staged
    study also names its strategy and ``max_drop`` (its objective is the energy within that budget); a network
    with an input neuron names it."""
    keys = ["levels", "fire", "rounding", "percentile", "search", "val_fraction", "seed", "calib_limit"]
    if cfg.val_fraction is None:
        keys[keys.index("val_fraction")] = "val_size"
    record: dict[str, Any] = {"source": source, **{k: getattr(cfg, k) for k in keys}}
    if cfg.softmax_levels != "fire":          # studies made before dense post-softmax levels keep their names
        record["softmax_levels"] = cfg.softmax_levels
    if fidelity.of(cfg.to_dict()) == "output":     # cosines, not accuracies: never a classifier's study
        record["fidelity"] = "output"
    if strategy_of(cfg) == "staged":          # its objective depends on the budget; tpe studies keep their names
        record.update(strategy="staged", max_drop=cfg.max_drop)
    if cfg.correction == "search":            # trials scored corrected: other figures for the same λ
        record["bias_correction"] = "search"
    if cfg.input_encoding == "spikes":        # an input neuron: another network (analog studies keep their names;
        record["input_encoding"] = "spikes"   # convert resolves auto before the search)
    if val_data is not None:
        record["val_data"] = val_data.fingerprint()[:16]
    blob = json.dumps(record, sort_keys=True, default=str)
    return "sfn-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def _first_line(e: BaseException) -> str:
    """The driver's message of a storage error, first line only (no SQL text, no SQLAlchemy link)."""
    if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__                       # Optuna's wrapper around the SQLAlchemy error
    inner = getattr(e, "orig", None) or e
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


def _check_sqlite_file(path: str, shown: str) -> None:
    """Clear errors for the usual mistakes before SQLAlchemy sees the file."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UserError(f"--storage {shown}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"--storage {shown}: is a folder, not a SQLite file")
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            with open(path, "rb") as f:
                magic = f.read(16)
        except OSError as e:
            raise UserError(f"--storage {shown}: cannot read ({e.strerror})") from None
        if magic != b"SQLite format 3\0":
            raise UserError(f"--storage {shown}: not a SQLite database")


def _storage(url: str | None, heartbeat_interval: int, grace_period: int):
    if url is None:
        return optuna.storages.InMemoryStorage()
    shown = redacted(url) or url
    if journal_path(url):
        return _journal_storage(os.path.abspath(url), shown, heartbeat_interval, grace_period)
    path = storage_path(url)
    if path and path != ":memory:" and not url.startswith("sqlite:///file:"):   # (a URI names its own file)
        _check_sqlite_file(os.path.abspath(path), shown)
    if "://" not in url:                      # a plain path means a SQLite file
        url = "sqlite:///" + os.path.abspath(url)
    with warnings.catch_warnings():           # the heartbeat options are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)
        try:
            if url.startswith("sqlite"):
                return _sqlite_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                       heartbeat_stale_trial_callback=retry)
            return _rdb_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                heartbeat_stale_trial_callback=retry)
        except Exception as e:
            raise UserError(f"--storage {shown}: cannot open Optuna storage ({_first_line(e)})") from None


def _rdb_storage(url: str, attempts: int = 5, **kw):
    """An RDBStorage on a database server (PostgreSQL, MySQL). Workers started together on an empty database race
    to create Optuna's tables and types; the losers' CREATE fails (PostgreSQL: duplicate key in pg_type, MySQL:
    table already exists) and they retry, then find the tables made."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:
            text = str(e).lower()
            if attempt == attempts - 1 or not ("already exists" in text or "duplicate" in text):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _sqlite_storage(url: str, attempts: int = 5, **kw):
    """An RDBStorage whose transactions take SQLite's write lock at BEGIN.

    SQLite ignores SELECT ... FOR UPDATE, so two workers could both read an enqueued trial as
    WAITING and both run it; BEGIN IMMEDIATE serialises those read-then-write transactions.
    Workers starting together may also race to create the schema: the loser retries.
    """
    from sqlalchemy import event

    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kw)
            break
        except Exception as e:
            if attempt == attempts - 1 or "readonly" in str(e) or "unable to open" in str(e):
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


_JOURNAL_MAGIC = b'{"op_code":'       # how Optuna's JournalFileBackend starts every record


def _check_journal_file(path: str, shown: str) -> None:
    """Refuse what cannot be an Optuna journal before Optuna appends to it: a missing folder, a folder, a device
    or FIFO, an unreadable file, a non-empty file whose first record is not a journal record."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UserError(f"--storage {shown}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"--storage {shown}: is a folder, not an Optuna journal file")
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"--storage {shown}: is a symbolic link to a missing file")
    if not os.path.exists(path):
        return                                # a new journal: Optuna creates the empty file
    if not os.path.isfile(path):
        raise UserError(f"--storage {shown}: is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_JOURNAL_MAGIC))
    except OSError as e:
        raise UserError(f"--storage {shown}: cannot read ({e.strerror})") from None
    if head and head != _JOURNAL_MAGIC:
        raise UserError(f"--storage {shown}: not an Optuna journal file (a path ending in {JOURNAL_SUFFIX} "
                        "names a journal; another storage needs another name)")


class _JournalFile(JournalFileBackend):
    """Optuna's journal file, whose I/O errors (a read-only folder, a full disk, a damaged record) are
    StorageInternalErrors, so that :func:`run_search` turns them into one-line UserErrors."""

    def read_logs(self, log_number_from: int):
        try:
            yield from super().read_logs(log_number_from)
        except OSError as e:
            raise optuna.exceptions.StorageInternalError(str(e)) from None
        except ValueError as e:            # a record that is not JSON, with more records after it
            raise optuna.exceptions.StorageInternalError(f"damaged journal record ({e})") from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            super().append_logs(logs)
        except OSError as e:
            raise optuna.exceptions.StorageInternalError(str(e)) from None


class _JournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat that Optuna gives only its RDBStorage.

    A running trial's worker writes the system attribute ``sfn:heartbeat`` (its clock's time) every
    ``heartbeat_interval`` seconds. A journal has no clock of its own, so a reader does not compare that time with
    its own: it declares a trial stale once the trial's heartbeat has not changed for ``grace_period`` seconds of
    its own (monotonic) clock, counted from when it first saw that heartbeat. Machines need not agree on the time;
    a worker started after another one died waits out the grace period before it takes the dead trial over.
    """

    BEAT = "sfn:heartbeat"

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback
        self._seen: dict[int, tuple[Any, float]] = {}   # trial id -> (heartbeat, when this process first saw it)

    def record_heartbeat(self, trial_id: int) -> None:
        # a trial finished (or failed by another worker), or a failed write: skipped (the worker's own next
        # storage call reports a lasting storage error)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError,
                                 optuna.exceptions.StorageInternalError, KeyError):
            self.set_trial_system_attr(trial_id, self.BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, seen, stale = time.monotonic(), {}, []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            beat = t.system_attrs.get(self.BEAT)
            if beat is None:                  # no heartbeat yet: _is_dead's rule for unmarked trials applies
                continue
            last, since = self._seen.get(t._trial_id, (None, now))
            seen[t._trial_id] = (beat, since if last == beat else now)
            if now - seen[t._trial_id][1] > self.grace_period:
                stale.append(t._trial_id)
        self._seen = seen                     # finished trials are forgotten
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback


def _journal_storage(path: str, shown: str, heartbeat_interval: int, grace_period: int):
    """An Optuna journal file (``--storage PATH.journal``) with the lock that works on NFS (v3 or later): the
    lock file ``PATH.journal.lock`` is created with O_EXCL, and one left by a worker killed while appending is
    broken after 30 s. Opening reads (replays) the whole journal, so a damaged one is refused here."""
    _check_journal_file(path, shown)
    with warnings.catch_warnings():           # the heartbeat callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)
    try:
        lock = JournalFileOpenLock(path)
        return _JournalStorage(_JournalFile(path, lock_obj=lock), heartbeat_interval, grace_period, retry)
    except optuna.exceptions.StorageInternalError as e:
        raise UserError(f"--storage {shown}: cannot open Optuna journal ({_first_line(e)})") from None
    except OSError as e:
        raise UserError(f"--storage {shown}: cannot open Optuna journal ({e.strerror or e})") from None
    except Exception as e:                    # a record Optuna cannot replay
        raise UserError(f"--storage {shown}: not a valid Optuna journal ({type(e).__name__}: "
                        f"{_first_line(e)})") from None


def _heartbeats(storage) -> bool:
    """A storage that several workers share and whose running trials have heartbeats (a database, a journal)."""
    return isinstance(storage, BaseHeartbeat)


def _finished(t) -> bool:
    """A trial that counts towards ``--trials``: completed, or stopped by the staged search's pruner after it ran
    some images (it records how many); a trial pruned because the study was already full does not count."""
    return t.state == optuna.trial.TrialState.COMPLETE or (
        t.state == optuna.trial.TrialState.PRUNED and "images" in t.user_attrs)


def _completed(study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if _finished(t))


def _namespace() -> str | None:
    """This boot's process namespace (Linux), so that a pid in a worker mark can be checked here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {ns}".encode()).hexdigest()[:16]


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    try:                                      # a killed child its parent has not reaped yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _is_dead(t, here: str | None, grace: int) -> bool:
    """A running trial that fail_stale_trials cannot see as dead (see the module docstring)."""
    mark = t.user_attrs.get("worker")
    if not isinstance(mark, dict) or mark.get("trial") != t.number:   # unmarked (or a retry's copied mark)
        start = t.datetime_start
        return start is not None and (datetime.datetime.now() - start).total_seconds() > grace
    pid = mark.get("pid")
    return here is not None and mark.get("ns") == here and isinstance(pid, int) and pid > 0 and _process_gone(pid)


def _fail(study, storage, trial_id: int) -> None:
    """Set one running trial to FAIL and queue its parameters again, as fail_stale_trials does."""
    try:
        if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:   # another worker failed it first
        return
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        callback(study, copy.deepcopy(storage.get_trial(trial_id)))


def _census(study, storage, grace: int, here: str | None, exclude: int | None = None,
            fail_stale: bool = True) -> tuple[int, list]:
    """The number of finished trials (:func:`_finished`) and the running trials of live workers, after failing
    the dead ones."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    rdb = _heartbeats(storage)   # a database or journal storage
    if rdb and fail_stale:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    completed, live = 0, []
    for t in study.get_trials(deepcopy=False, states=states):
        if t.state != optuna.trial.TrialState.RUNNING:
            completed += _finished(t)
        elif t.number == exclude:
            continue
        elif rdb and _is_dead(t, here, grace):
            _fail(study, storage, t._trial_id)
        else:
            live.append(t)
    return completed, live


def run_search(graph: Graph, data: Dataset, cfg: ConvertConfig, source: dict, quiet: bool = True, *,
               heartbeat_interval: int | None = None, grace_period: int | None = None) -> SearchResult:
    """Run (or continue) the study until it holds ``cfg.trials`` completed trials; return its Pareto front.

    The trials are scored on ``data.validation_split`` (``data.validation`` when set, else images of ``data``;
    ``cfg.val_size`` / ``cfg.val_fraction``), recorded in the result's ``validation``.
    ``heartbeat_interval`` and ``grace_period`` (whole seconds; default ``HEARTBEAT_INTERVAL`` and
    ``GRACE_PERIOD``) apply to database and journal storages: see the module docstring for how the trials of dead
    workers are recognised.
    """
    import sqlalchemy.exc

    heartbeat_interval = heartbeat_interval or HEARTBEAT_INTERVAL
    grace_period = grace_period or GRACE_PERIOD
    shown = redacted(cfg.storage) or "memory"
    storage = _storage(cfg.storage, heartbeat_interval, grace_period)
    try:
        return _run(graph, data, cfg, source, quiet, storage, grace_period, shown)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        raise UserError(f"--storage {shown}: {_first_line(e)}") from None
    finally:                # the trials' corrections (--bias-correction search) are not the chosen point's
        bias_correction.revert(graph)


def _open_study(name: str, storage, sampler, groups: dict, attrs: dict, strategy: str = "tpe", pruner=None):
    """Load the study, or create it (then this worker alone records ``groups`` and ``attrs`` and, for the tpe
    strategy, enqueues the start grid); refuse a study made for other λ groups or by the other strategy."""
    directions: list[Any] = ["minimize"] if strategy == "staged" else ["maximize", "minimize"]
    created = False
    try:                                      # load first: a finished study can be read from a read-only file
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        directions=directions)
            created = True
        except optuna.exceptions.DuplicatedStudyError:   # another worker made it meanwhile
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if study.user_attrs.get("groups") not in (None, groups):
        raise UserError(f"study {name!r} was made for other λ groups; choose another --study")
    if len(study.directions) != len(directions):
        other = "tpe" if strategy == "staged" else "staged"
        raise UserError(f"study {name!r} was made by the {other} search strategy; choose another --study or "
                        f"--strategy {other}")
    if created:                               # only the creator enqueues the start grid
        study.set_user_attr("groups", groups)
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        if strategy == "tpe":
            for v in SHARED_GRID:
                study.enqueue_trial({f"lam:{g}": v for g in groups})
    return study


class _Staged:
    """The staged strategy's part of a worker (:mod:`sfn_deploy.staged`): what it enqueues before each trial,
    how a trial is scored (on growing image subsets, pruned by :class:`staged.RungPruner`), and the choice."""

    def __init__(self, context: staged.Context, evaluator: staged.Evaluator):
        self.context, self.evaluator = context, evaluator
        self.pruner = staged.RungPruner(self.context)
        self.trials: list = []

    def before_trial(self, study) -> None:
        """Enqueue the plan's next point (the plan leaves out points already in the study, waiting ones too; the
        warm start repeats a shared point on purpose), unless the sampler's turn has come."""
        self.trials = study.get_trials(deepcopy=False)
        step = staged.plan(self.trials, self.context)
        if step is not None:
            lam, stage = step
            study.enqueue_trial({f"lam:{g}": v for g, v in lam.items()}, user_attrs={"stage": stage})

    def trial(self, study, trial: optuna.Trial, per_site: dict[str, float]) -> float:
        c = self.context
        c.update(self.trials)                 # the finished trials as before_trial read them
        if trial.user_attrs.get("stage") is None:
            trial.set_user_attr("stage", "tpe")
        copied = self._copy(study, trial, per_site) if trial.user_attrs["stage"] == "warm" else None
        if copied is not None:
            return copied
        for r in self.evaluator.run(per_site):
            trial.set_user_attr("rung", r.__dict__)          # what the pruner reads
            trial.report(staged.score(r.accuracy, r.energy, c.target), r.images)
            if r.images < c.n and trial.should_prune():
                _record(trial, r)
                raise optuna.TrialPruned(f"stopped after {r.images} images")
        _record(trial, r)
        return staged.score(r.accuracy, r.energy, c.target)

    def _copy(self, study, trial: optuna.Trial, per_site: dict[str, float]) -> float | None:
        """The warm start repeats the best shared point, already run on every image: its figures are copied."""
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("images") == self.context.n and t.user_attrs.get("lam") == per_site:
                for k in ("rung", *staged.RUNG_FIGURES, "energy_ratio"):
                    trial.set_user_attr(k, t.user_attrs.get(k))
                trial.set_user_attr("copied_from", t.number)
                return staged.score(t.user_attrs["accuracy"], t.user_attrs["energy_ratio"], self.context.target)
        return None

    def finish(self, study) -> tuple[list[ParetoPoint], Chosen | None, list[dict]]:
        """The front of the points run on every image, and the chosen point with its neighbour checks."""
        trials = study.get_trials(deepcopy=False)
        points = _points(trials, self.context)
        front = [ParetoPoint(trial=p.trial, accuracy=p.accuracy, energy_ratio=p.energy_ratio, lam=p.lam)
                 for p in points if not any(q.accuracy >= p.accuracy and q.energy_ratio <= p.energy_ratio
                                            and (q.accuracy, -q.energy_ratio) != (p.accuracy, -p.energy_ratio)
                                            for q in points)]
        front.sort(key=lambda r: (r.energy_ratio, -r.accuracy))
        chosen, checks = _checked_choice(points, self.context, self.evaluator)
        return front, chosen, checks


def _record(trial: optuna.Trial, r: staged.Rung) -> None:
    """The figures of the last rung run (``images`` < n: pruned there), which staged.Context reads."""
    for k in staged.RUNG_FIGURES:
        trial.set_user_attr(k, getattr(r, k))
    trial.set_user_attr("energy_ratio", r.energy)


def _points(trials: list, c: staged.Context) -> list[staged.Candidate]:
    """The trials run on every image (the warm start's copy left out), after updating ``c`` from the study."""
    c.update(trials)
    return [staged.Candidate(trial=t.number, accuracy=t.user_attrs["accuracy"],
                             energy_ratio=t.user_attrs["energy_ratio"], lam=t.user_attrs["lam"],
                             shared=staged.shared_value(staged.lams(t), c.groups) is not None)
            for t in trials if staged._full(t, c.n) and t.user_attrs.get("stage") != "warm"]


def _checked_choice(points: list[staged.Candidate], c: staged.Context, evaluator: staged.Evaluator
                    ) -> tuple[Chosen | None, list[dict]]:
    """The cheapest point within budget that holds at its neighbours (:func:`staged.select`), for either
    strategy; with no point within budget, the most accurate."""
    def evaluate(lam: dict[str, float], floor: float) -> staged.Rung:
        return evaluator.full(lam, stop=lambda r: r.drop_low() > c.ann_accuracy - floor + 1e-9)

    p, rule, checks = staged.select(points, c, evaluate)
    if p is None and points:
        p = max(points, key=lambda q: (q.accuracy, -q.energy_ratio))
        rule = (f"no configuration within {c.max_drop} points; most accurate taken" if c.max_drop is not None
                else "max accuracy")
    chosen = None if p is None else Chosen(trial=p.trial, accuracy=p.accuracy, energy_ratio=p.energy_ratio,
                                           lam=p.lam, rule=rule)
    return chosen, [k.to_dict() for k in checks]


def _check_figures(study, shown: str, sites: set[str]) -> None:
    """Refuse a study whose finished trials carry figures this module never writes (the study file was edited or
    damaged): the choice and the staged plan read them, and the result reports the study's ANN accuracy."""
    ann = study.user_attrs.get("ann_accuracy")
    if ann is not None and not _number(ann):
        raise UserError(f"--storage {shown}: study {study.study_name!r}: its ANN accuracy {ann!r} is not a finite "
                        "number; the study was changed outside sfn-deploy (use another --study or --storage)")
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                      optuna.trial.TrialState.PRUNED)):
        what = _damage(t.user_attrs, sites)
        if what:
            raise UserError(f"--storage {shown}: study {study.study_name!r}, trial {t.number}: {what}; the study "
                            "was changed outside sfn-deploy (use another --study or --storage)")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _damage(a: dict, sites: set[str]) -> str | None:
    for k in ("accuracy", "energy_ratio", "diff_sum", "diff_squares"):
        if a.get(k) is not None and not _number(a[k]):
            return f"{k} {a[k]!r} is not a finite number"
    for k in ("images", "ann_only", "snn_only"):
        v = a.get(k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return f"{k} {v!r} is not a count"
    lam = a.get("lam")
    if lam is not None and not (isinstance(lam, dict) and all(
            k in sites and _number(v) and v > 0 for k, v in lam.items())):
        return "its λ is not a map of this model's sites to positive numbers"
    return None


def _reseed_beside_others(study, seed: int, here: str | None, multivariate: bool) -> None:
    """Once another worker's trials are in the study, seed this worker's sampler from ``seed``, the trial count
    and this process before each trial: workers with one ``--seed`` (it also picks the validation images) would
    otherwise draw the same λ from the same random stream. A worker alone keeps its one seeded stream
    (reproducible); several workers' order of trials depends on timing anyway."""
    trials = study.get_trials(deepcopy=False)
    pid = os.getpid()
    if all((t.user_attrs.get("worker") or {}).get("ns", here) == here
           and (t.user_attrs.get("worker") or {}).get("pid", pid) == pid for t in trials):
        return
    mixed = int(hashlib.sha256(f"{seed} {len(trials)} {here} {pid}".encode()).hexdigest()[:8], 16)
    study.sampler = optuna.samplers.TPESampler(seed=mixed, multivariate=multivariate)


def _run(graph, data, cfg, source, quiet, storage, grace, shown: str) -> SearchResult:
    val, record = data.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)
    val = val.in_memory(quiet=quiet)      # every trial reads it: decoded once (--val-size images, docs/data.md)
    ref = evaluation.ann_reference(graph, val, fidelity.of(cfg.to_dict()), cfg.batch_size)
    ann_acc = 100.0 * float(ref.ann.mean())
    groups = site_groups(graph, cfg.search)
    strategy = strategy_of(cfg)
    name = cfg.study or study_name(source, cfg, data.validation)
    if optuna.logging.get_verbosity() < optuna.logging.WARNING:   # quieter than Optuna's INFO; a caller's
        optuna.logging.set_verbosity(optuna.logging.WARNING)      # stricter setting is kept
    correct = bias_correction.images(data, cfg.batch_size, cfg.seed) if cfg.correction == "search" else None
    context = staged.Context(ann_accuracy=ann_acc, max_drop=cfg.max_drop, n=len(val), groups=list(groups))
    evaluator = staged.Evaluator(graph, val.x, ref, cfg.batch_size, evaluation.energy_constants(), cfg.seed,
                                 correct)
    plan = _Staged(context, evaluator) if strategy == "staged" else None
    # staged: univariate TPE after the planned points (it combines what each group tolerates, see staged.py)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=plan is None)
    attrs = {"ann_accuracy": ann_acc, "val_samples": len(val), "validation": record.to_dict()}
    study = _open_study(name, storage, sampler, groups, {**attrs, "strategy": strategy} if plan else attrs,
                        strategy, plan.pruner if plan else None)
    sites = {s.name for s in graph.sites}
    _check_figures(study, shown, sites)
    here = _namespace()
    rdb = _heartbeats(storage)   # a database or journal storage
    state: dict[str, Any] = {"pruned": False, "superseded": False, "returned": False, "trial_id": None}

    def evaluate(trial: optuna.Trial):
        lam = {g: trial.suggest_float(f"lam:{g}", *staged.LAM_RANGE, log=True) for g in groups}
        per_site = {s: lam[g] for g, members in groups.items() for s in members}
        if plan is not None:
            trial.set_user_attr("lam", per_site)
            return plan.trial(study, trial, per_site)
        r = evaluator.full(per_site)
        _record(trial, r)
        trial.set_user_attr("lam", per_site)
        return r.accuracy, r.energy

    def objective(trial: optuna.Trial):
        state["trial_id"] = trial._trial_id
        try:
            if rdb:                           # heartbeat first, then the mark: a marked trial always has one
                storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("worker", {"ns": here, "pid": os.getpid(), "trial": trial.number})
            # Optuna failed the stale trials just before this one: only the other rules are left to apply
            completed, live = _census(study, storage, grace, here, exclude=trial.number, fail_stale=False)
            ahead = [t for t in live if t.number < trial.number]
            if completed + len(ahead) >= cfg.trials:
                state["pruned"] = True
                raise optuna.TrialPruned("the study already has the requested number of trials")
            values = evaluate(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            state["superseded"] = True        # another worker declared this trial dead and failed it
            raise
        state["returned"] = True
        return values

    def before(study) -> None:
        if rdb:
            _reseed_beside_others(study, cfg.seed, here, multivariate=plan is None)
        if plan is not None:
            plan.before_trial(study)

    _loop(study, storage, cfg.trials, grace, here, objective, state, name, quiet, before=before)
    _check_figures(study, shown, sites)
    if plan is None:
        front = sorted((ParetoPoint(trial=t.number, accuracy=t.values[0], energy_ratio=t.values[1],
                                    lam=t.user_attrs["lam"]) for t in study.best_trials),
                       key=lambda r: (r.energy_ratio, -r.accuracy))
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        chosen, checks = None, None
        if all(staged._full(t, len(val)) for t in trials):   # else trials of an earlier version: choose() rules
            chosen, checks = _checked_choice(_points(trials, context), context, evaluator)
    else:
        front, chosen, checks = plan.finish(study)
    return SearchResult(study=name, storage=shown,
                        trials_completed=_completed(study),
                        ann_accuracy=study.user_attrs.get("ann_accuracy", ann_acc), val_samples=len(val),
                        groups={g: len(m) for g, m in groups.items()}, pareto_front=front, chosen=chosen,
                        validation=record, strategy="staged" if plan else None,
                        max_drop=cfg.max_drop, checks=checks, images=evaluator.images)


def _loop(study, storage, trials: int, grace: int, here, objective, state: dict, name: str, quiet: bool,
          before=None) -> None:
    """Run trials one at a time until the study holds ``trials`` finished ones (see the module docstring)."""
    rdb = _heartbeats(storage)   # a database or journal storage
    done = _completed(study)
    bar = progress(None, "λ search", quiet=quiet, total=trials)
    bar.update(min(done, trials))
    shown_done = min(done, trials)
    wasted, wasted_limit = 0, max(5, trials)     # pruned or superseded trials of this worker
    pause = 0.1
    try:
        while True:
            done, live = _census(study, storage, grace, here)
            if min(done, trials) > shown_done:
                bar.update(min(done, trials) - shown_done)
                shown_done = min(done, trials)
            if done >= trials:
                break
            if done + len(live) >= trials:        # the missing trials are running elsewhere
                bar.set_postfix_str(f"waiting for {len(live)} running trial(s)")
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            if pause > 0.1:
                bar.set_postfix_str("")
            pause = 0.1
            state.update(pruned=False, superseded=False, returned=False, trial_id=None)
            if before is not None:
                before(study)
            try:
                study.optimize(objective, n_trials=1, catch=())
            except Exception:
                # another worker declared this trial dead and failed it (during the trial, or between the
                # trial's end and Optuna's tell): drop it and go on
                state["superseded"] = state["superseded"] or (
                    rdb and state["returned"]
                    and storage.get_trial(state["trial_id"]).state == optuna.trial.TrialState.FAIL)
                if not state["superseded"]:
                    raise
            if state["pruned"] or state["superseded"]:
                wasted += 1
                if wasted > wasted_limit:
                    raise UserError(f"λ search: {wasted} trials of this worker were pruned or taken over "
                                    f"before reaching {trials} completed trials in study {name!r}; "
                                    "check the other workers")
    finally:
        bar.close()


def choose(result: SearchResult, max_drop: float | None) -> Chosen:
    """The search's own choice (the cheapest point within budget that holds at its neighbours,
    :func:`staged.select`) when ``max_drop`` is the budget it was made for; else, or for a study begun by a
    version that recorded no neighbour-check figures: the most accurate point (ties: cheaper), with a budget the
    cheapest point within max_drop points."""
    if result.chosen is not None and result.max_drop == max_drop:
        return result.chosen
    front = result.pareto_front
    if not front:
        raise UserError("the λ search finished no trial")
    best = max(front, key=lambda r: (r.accuracy, -r.energy_ratio))
    if max_drop is None:
        return _chosen(best, "max accuracy")
    ok = [r for r in front if r.accuracy >= result.ann_accuracy - max_drop]
    if not ok:
        return _chosen(best, f"no configuration within {max_drop} points; most accurate taken")
    return _chosen(min(ok, key=lambda r: r.energy_ratio), f"lowest energy within {max_drop} points")


def _chosen(p: ParetoPoint, rule: str) -> Chosen:
    return Chosen(trial=p.trial, accuracy=p.accuracy, energy_ratio=p.energy_ratio, lam=p.lam, rule=rule)


def apply_sfn(graph: Graph, data: Dataset, config: ConvertConfig, *, source: dict | None = None,
              quiet: bool = True) -> Applied:
    """``apply`` of the sfn method (:mod:`sfn_deploy.methods`): λ fixed by ``scale``, else searched here and
    chosen by :func:`choose`."""
    if config.scale is not None:
        set_scale(graph, config.scale)
        return Applied()
    result = run_search(graph, data, config, source or {}, quiet=quiet)
    result.chosen = choose(result, config.max_drop)
    set_scale(graph, result.chosen.lam)
    return Applied(search=result.to_dict())
