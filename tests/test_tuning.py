"""λ search: resumable, multi-worker, Pareto front and accuracy budget."""
import importlib
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from conftest import SLOW_TRIALS, finish_worker, wait_started

from sfn_deploy import tuning
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.errors import UserError
from sfn_deploy.tuning import ParetoPoint, SearchResult, choose, run_search, site_groups


def _completed(storage, name):
    """The trials that count towards --trials: completed, or stopped by the staged search's pruner after
    running some images."""
    s = optuna.load_study(study_name=name, storage=storage)
    return [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE
            or (t.state == optuna.trial.TrialState.PRUNED and "images" in t.user_attrs)]


def test_interrupted_search_resumes_without_losing_trials(tmp_path, digits, digits_mlp):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = load_config("", {"trials": 9, "storage": url, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    first = {t.number: t.values for t in _completed(url, "s")}
    assert len(first) == 9
    cfg.trials = 12
    result = run_search(g, digits, cfg, {})
    again = {t.number: t.values for t in _completed(url, "s")}
    assert len(again) == 12 and result.trials_completed == 12
    assert all(again[k] == v for k, v in first.items())      # nothing recomputed or lost


WORKER = r"""
import torch
torch.set_num_threads(1)
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
from sfn_deploy.tuning import run_search
d = load_data("sklearn:digits")
cfg = load_config("", dict(trials=14, storage={url!r}, study="shared", val_fraction=0.3, search="per-block"))
g = build_graph(torch.load({model!r}, weights_only=False), d, cfg, quiet=True)
run_search(g, d, cfg, {{}})
"""


@pytest.fixture(scope="module")
def mlp_file(digits_mlp, tmp_path_factory):
    """The digits MLP for worker processes (trained once here, not in every worker)."""
    import torch
    path = tmp_path_factory.mktemp("mlp") / "digits_mlp.pt"
    torch.save(digits_mlp, path)
    return str(path)


def test_two_workers_share_one_study_and_record_each_trial_once(tmp_path, mlp_file):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    code = WORKER.format(model=mlp_file, url=url)
    # create the study first, so both workers find the same enqueued start points
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    done = _completed(url, "shared")
    assert len(done) == 14
    assert len({t.number for t in done}) == 14
    study = optuna.load_study(study_name="shared", storage=url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_choose_respects_the_budget():
    result = SearchResult(study="s", storage="memory", trials_completed=3, ann_accuracy=98.0, val_samples=100,
                          groups={"all": 2}, pareto_front=[
                              ParetoPoint(trial=1, accuracy=98.2, energy_ratio=0.30, lam={}),
                              ParetoPoint(trial=2, accuracy=97.8, energy_ratio=0.20, lam={}),
                              ParetoPoint(trial=3, accuracy=96.0, energy_ratio=0.10, lam={})])
    assert choose(result, None).trial == 1
    assert choose(result, 0.3).trial == 2
    assert choose(result, 2.5).trial == 3
    assert choose(result, 0.0).trial == 1       # only trial 1 is within 0 points


def test_groups(digits, digits_mlp):
    g = build_graph(digits_mlp, digits, load_config("", {}), quiet=True)
    assert site_groups(g, "shared") == {"all": [s.name for s in g.sites]}
    assert sorted(site_groups(g, "per-site")) == sorted(s.name for s in g.sites)


def test_study_made_for_other_groups_is_refused(tmp_path, digits, digits_mlp):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    cfg = load_config("", {"trials": 2, "storage": url, "study": "s", "val_fraction": 0.2})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    cfg.search = "per-site"
    from sfn_deploy.errors import UserError
    with pytest.raises(UserError, match="other λ groups"):
        run_search(g, digits, cfg, {})


# ---- dead workers, bounded loop, storage errors -------------------------------------------------

SLOW_WORKER = SLOW_TRIALS + r"""
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
if {remote}:                                 # pretend to run on another machine: only heartbeats tell
    tuning._namespace = lambda: "another-machine"
tuning.HEARTBEAT_INTERVAL, tuning.GRACE_PERIOD = {heartbeat}
d = load_data("sklearn:digits")
cfg = load_config("", dict(trials={trials}, storage={url!r}, study="s", val_fraction=0.3))
g = build_graph(torch.load({model!r}, weights_only=False), d, cfg, quiet=True)
tuning.run_search(g, d, cfg, {{}})
"""


@pytest.fixture
def worker(tmp_path, mlp_file):
    """Start a worker process on the study ``s`` at url; whatever still runs at the end is killed."""
    procs = []

    def start(url, trials, sleep, remote=False, heartbeat=(10, 30)):
        code = SLOW_WORKER.format(model=mlp_file, marker=str(tmp_path / "started"), sleep=sleep,
                                  remote=remote, trials=trials, url=url, heartbeat=heartbeat)
        procs.append(subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE))
        return procs[-1]
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _states(url, name="s"):
    trials = optuna.load_study(study_name=name, storage=url).trials
    return {s: [t for t in trials if t.state == s] for s in optuna.trial.TrialState}


def _assert_finished(url, n, dead=1):
    """Exactly n completed trials, nothing left running, the dead trial(s) failed, no flood of pruned trials
    (WAITING trials are the start grid and retries still queued: they were never run)."""
    states = _states(url)
    assert len(states[optuna.trial.TrialState.COMPLETE]) == n
    assert len({t.number for t in states[optuna.trial.TrialState.COMPLETE]}) == n
    assert not states[optuna.trial.TrialState.RUNNING]
    assert len(states[optuna.trial.TrialState.FAIL]) == dead
    assert len(states[optuna.trial.TrialState.PRUNED]) <= 2
    return states


def test_rerun_after_kill_9_finishes_at_once_with_exactly_n_trials(tmp_path, worker):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    victim = worker(url, trials=5, sleep=1000)     # its first λ trial never ends
    wait_started(tmp_path, victim)
    victim.kill()                                              # kill -9 mid-trial
    victim.wait()
    assert len(_states(url)[optuna.trial.TrialState.RUNNING]) == 1
    start = time.time()
    finish_worker(worker(url, trials=5, sleep=0), timeout=60)
    # same machine: the dead process is seen at once, no waiting out the 30 s grace period
    assert time.time() - start < 25
    states = _assert_finished(url, 5)
    dead = states[optuna.trial.TrialState.FAIL][0]
    # the dead trial's start point (λ 0.1, the first enqueued) is queued again, behind the rest of the grid
    assert [t.params for t in states[optuna.trial.TrialState.WAITING]
            if t.system_attrs.get("failed_trial") == dead.number] == [dead.params]


def test_two_workers_one_killed_the_other_completes_the_study(tmp_path, worker):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    victim = worker(url, trials=8, sleep=1000)     # its first λ trial never ends
    survivor = worker(url, trials=8, sleep=0.2)
    wait_started(tmp_path, victim)
    wait_started(tmp_path, survivor)
    victim.kill()
    victim.wait()
    finish_worker(survivor, timeout=60)
    _assert_finished(url, 8)


def test_dead_worker_on_another_machine_is_given_up_after_the_grace_period(tmp_path, worker):
    url = f"sqlite:///{tmp_path / 'remote.db'}"
    victim = worker(url, trials=4, sleep=1000, remote=True, heartbeat=(1, 2))
    survivor = worker(url, trials=4, sleep=0.1, heartbeat=(1, 2))
    wait_started(tmp_path, victim)
    wait_started(tmp_path, survivor)
    victim.kill()
    victim.wait()
    finish_worker(survivor, timeout=60)
    _assert_finished(url, 4)


class _Timeout(Exception):
    pass


def _alarm(seconds):
    def handler(*_):
        raise _Timeout(f"run_search did not return within {seconds} s")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def test_running_trial_without_heartbeat_is_given_up(tmp_path, digits, digits_mlp, monkeypatch):
    """A RUNNING trial left by a version without heartbeats (or killed before its first one)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = load_config("", {"trials": 2, "storage": url, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    optuna.load_study(study_name="s", storage=url).ask()       # RUNNING forever, no heartbeat, no mark
    time.sleep(2.1)
    cfg.trials = 4
    monkeypatch.setattr(tuning, "GRACE_PERIOD", 2, raising=False)
    _alarm(30)
    try:
        result = run_search(g, digits, cfg, {})
    finally:
        signal.alarm(0)
    assert result.trials_completed == 4
    _assert_finished(url, 4)


def _on_score(monkeypatch, action, at: int | None = None):
    """Wrap staged.Evaluator.run (one λ point's evaluation: a trial, or a neighbour check after the search) to
    call action() on its call number ``at`` (on every call when None); return the real one."""
    staged = importlib.import_module("sfn_deploy.staged")
    real, calls = staged.Evaluator.run, []

    def run(self, lam):
        calls.append(1)
        if at is None or len(calls) == at:
            action()
        yield from real(self, lam)
    monkeypatch.setattr(staged.Evaluator, "run", run)
    return real


def _raise(e: BaseException):
    def action():
        raise e
    return action


def test_ctrl_c_fails_the_running_trial_and_propagates(tmp_path, digits, digits_mlp, monkeypatch):
    staged = importlib.import_module("sfn_deploy.staged")
    url = f"sqlite:///{tmp_path / 'int.db'}"
    cfg = load_config("", {"trials": 4, "storage": url, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    real = _on_score(monkeypatch, _raise(KeyboardInterrupt()), at=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(g, digits, cfg, {})
    states = _states(url)
    assert len(states[optuna.trial.TrialState.COMPLETE]) == 1
    assert len(states[optuna.trial.TrialState.FAIL]) == 1
    assert not states[optuna.trial.TrialState.RUNNING]
    monkeypatch.setattr(staged.Evaluator, "run", real)
    assert run_search(g, digits, cfg, {}).trials_completed == 4


@pytest.mark.parametrize("when", ["during the trial", "before its tell"])
def test_trial_failed_by_another_worker_is_dropped(tmp_path, digits, digits_mlp, monkeypatch, when):
    """A live worker whose trial another worker declared dead (suspended past the grace period) goes on."""
    url = f"sqlite:///{tmp_path / 'taken.db'}"
    cfg = load_config("", {"trials": 3, "storage": url, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    calls = []

    def fail_running():                     # what fail_stale_trials in another worker would do
        other = optuna.storages.RDBStorage(url)
        (running,) = optuna.load_study(study_name="s", storage=other).get_trials(
            states=(optuna.trial.TrialState.RUNNING,))
        other.set_trial_state_values(running._trial_id, optuna.trial.TrialState.FAIL)

    if when == "during the trial":
        _on_score(monkeypatch, fail_running, at=2)
    else:
        real = optuna.Trial.set_user_attr

        def set_user_attr(self, key, value):
            real(self, key, value)
            if key == "lam":
                calls.append(1)
                if len(calls) == 2:
                    fail_running()
        monkeypatch.setattr(optuna.Trial, "set_user_attr", set_user_attr)
    assert run_search(g, digits, cfg, {}).trials_completed == 3
    _assert_finished(url, 3)


def test_a_failing_trial_still_raises(tmp_path, digits, digits_mlp, monkeypatch):
    url = f"sqlite:///{tmp_path / 'bug.db'}"
    cfg = load_config("", {"trials": 3, "storage": url, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    _on_score(monkeypatch, _raise(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_search(g, digits, cfg, {})


def _one_line_error(tmp_path, digits, digits_mlp, storage):
    cfg = load_config("", {"trials": 2, "storage": storage, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    with pytest.raises(UserError) as e:
        run_search(g, digits, cfg, {})
    msg = str(e.value)
    assert "\n" not in msg and "[SQL" not in msg and "sqlalche.me" not in msg, msg
    return msg


def test_storage_errors_are_one_line_user_errors(tmp_path, digits, digits_mlp):
    msg = _one_line_error(tmp_path, digits, digits_mlp, "/nonexistent/dir/x.db")
    assert msg.startswith("--storage /nonexistent/dir/x.db:") and "does not exist" in msg

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 20)
    msg = _one_line_error(tmp_path, digits, digits_mlp, str(text))
    assert msg.startswith(f"--storage {text}:") and "not a SQLite database" in msg

    db = tmp_path / "done.db"
    cfg = load_config("", {"trials": 1, "storage": str(db), "study": "s", "val_fraction": 0.3})
    run_search(build_graph(digits_mlp, digits, cfg, quiet=True), digits, cfg, {})
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    msg = _one_line_error(tmp_path, digits, digits_mlp, read_only)   # 2 trials wanted: it must write
    assert msg.startswith(f"--storage {read_only}:") and "readonly" in msg
    cfg.storage = read_only                                          # 1 trial wanted: it is done, just read
    assert run_search(build_graph(digits_mlp, digits, cfg, quiet=True), digits, cfg, {}).trials_completed == 1

    msg = _one_line_error(tmp_path, digits, digits_mlp, "postgresql://me:s3cret@127.0.0.1:1/db")
    assert msg.startswith("--storage postgresql://me:***@127.0.0.1:1/db:") and "s3cret" not in msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_database_file_is_a_user_error(tmp_path, digits, digits_mlp):
    db = tmp_path / "ro.db"
    cfg = load_config("", {"trials": 1, "storage": str(db), "study": "s", "val_fraction": 0.3})
    run_search(build_graph(digits_mlp, digits, cfg, quiet=True), digits, cfg, {})
    os.chmod(db, 0o444)
    msg = _one_line_error(tmp_path, digits, digits_mlp, str(db))
    assert msg.startswith(f"--storage {db}:") and "readonly" in msg


@pytest.mark.parametrize("strategy", ["tpe", "staged"])
@pytest.mark.parametrize("key, value, words", [
    ("accuracy", '"x"', "accuracy 'x' is not a finite number"),
    ("energy_ratio", "NaN", "energy_ratio nan is not a finite number"),
    ("images", "-5", "images -5 is not a count"),
    ("lam", '{"no_such_site": 0.2}', "its λ is not a map of this model's sites"),
])
def test_a_study_with_damaged_figures_is_refused_in_one_line(tmp_path, digits, digits_mlp, strategy, key, value,
                                                            words):
    """The choice and the staged plan read each trial's figures back from the study file: one edited or damaged
    there is refused (a UserError naming the storage and the trial), not an internal error."""
    import sqlite3
    db = tmp_path / "s.db"
    cfg = load_config("", {"trials": 2, "storage": str(db), "study": "s", "val_fraction": 0.3,
                           "strategy": strategy, "max_drop": 1.0})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    with sqlite3.connect(db) as c:
        assert c.execute("update trial_user_attributes set value_json = ? where key = ? and trial_id = "
                         "(select min(trial_id) from trial_user_attributes where key = ?)",
                         (value, key, key)).rowcount == 1
    with pytest.raises(UserError) as e:
        run_search(g, digits, cfg, {})
    assert str(e.value).startswith(f"--storage {db}: study 's', trial 0: {words}") and "\n" not in str(e.value)


def test_a_study_with_a_damaged_ann_accuracy_is_refused_in_one_line(tmp_path, digits, digits_mlp):
    import sqlite3
    db = tmp_path / "s.db"
    cfg = load_config("", {"trials": 1, "storage": str(db), "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    with sqlite3.connect(db) as c:
        c.execute("update study_user_attributes set value_json = '\"x\"' where key = 'ann_accuracy'")
    with pytest.raises(UserError, match=r"^--storage .*: study 's': its ANN accuracy 'x' is not a finite number"):
        run_search(g, digits, cfg, {})


# ---- the staged strategy (sfn_deploy/staged.py) --------------------------------------------------------------

from sfn_deploy import staged  # noqa: E402


def _staged_cfg(url=None, **kw):
    return load_config("", {"trials": 20, "search": "per-site", "val_fraction": 0.3, "max_drop": 1.0, "study": "s",
                            **({"storage": url} if url else {}), **kw})


def _trials(url, name="s"):
    return optuna.load_study(study_name=name, storage=url).trials


@pytest.fixture
def memory(monkeypatch):
    """One in-memory Optuna storage that run_search uses (without --storage) and the test can read."""
    storage = optuna.storages.InMemoryStorage()
    real = tuning._storage
    monkeypatch.setattr(tuning, "_storage", lambda url, *a: storage if url is None else real(url, *a))
    return storage


@pytest.fixture
def cliff(monkeypatch):
    """A synthetic accuracy landscape for the staged search, no network run: the drop is 0.2 points while every
    λ is below ``edge`` (after 0.2, issue 16's jump) and 20 points beyond; the energy ratio is mean(0.02/λ)."""
    edge = {"at": 0.205}

    def run(self, lam):
        drop = 0.2 if max(lam.values()) < edge["at"] else 20.0
        energy = sum(0.02 / v for v in lam.values()) / len(lam)
        start = 0
        for m in self.rungs:
            self.images += m - start
            start = m
            wrong = round(drop / 100 * m)
            ann = 100.0 * float(self.ref.ann[:m].mean())
            yield staged.Rung(images=m, accuracy=ann - 100.0 * wrong / m, ann_accuracy=ann, ann_only=wrong,
                              snn_only=0, energy=energy)
    monkeypatch.setattr(staged.Evaluator, "run", run)
    return edge


def test_staged_is_the_default_of_per_block_and_per_site():
    assert tuning.strategy_of(load_config("", {})) == "tpe"
    assert tuning.strategy_of(load_config("", {"search": "per-block"})) == "staged"
    assert tuning.strategy_of(load_config("", {"search": "per-site"})) == "staged"
    assert tuning.strategy_of(load_config("", {"search": "per-site", "strategy": "tpe"})) == "tpe"
    with pytest.raises(UserError, match="strategy"):
        load_config("", {"strategy": "random"})


def test_warm_start_enqueues_the_best_shared_point(memory, digits, digits_mlp):
    url = memory
    cfg = _staged_cfg(None)
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    result = run_search(g, digits, cfg, {})
    trials = _trials(url)
    n = result.val_samples
    stages = [t.user_attrs["stage"] for t in trials]
    assert stages[:len(staged.GRID)] == ["grid"] * len(staged.GRID)
    (warm,) = [t for t in trials if t.user_attrs["stage"] == "warm"]
    before = trials[:warm.number]
    assert {t.user_attrs["stage"] for t in before} <= {"grid", "refine"}          # after the shared stages
    assert {t.user_attrs["stage"] for t in trials[warm.number + 1:]} <= {"probe", "combine", "tpe"}
    feasible = [t for t in before if t.user_attrs["images"] == n
                and t.user_attrs["accuracy"] >= result.ann_accuracy - cfg.max_drop]
    best = min(feasible, key=lambda t: t.user_attrs["energy_ratio"])
    assert warm.params == best.params                                   # the cheapest shared point within budget
    assert warm.user_attrs["copied_from"] == best.number                # enqueued, not run again
    assert warm.system_attrs["fixed_params"] == best.params            # through study.enqueue_trial
    first_probe = trials[warm.number + 1]                                # the pattern search starts from it
    assert first_probe.user_attrs["stage"] == "probe"
    changed = [k for k in best.params if not math.isclose(first_probe.params[k], best.params[k])]
    assert len(changed) == 1 and math.isclose(first_probe.params[changed[0]], best.params[changed[0]] * staged.PROBE)


def test_chosen_point_is_never_dominated_by_an_evaluated_shared_point(memory, digits, digits_mlp):
    for max_drop in (1.0, None):
        cfg = _staged_cfg(None, max_drop=max_drop, study=f"s{max_drop}")
        g = build_graph(digits_mlp, digits, cfg, quiet=True)
        result = run_search(g, digits, cfg, {})
        chosen = choose(result, max_drop)
        assert chosen is result.chosen and "held at λ" in chosen.rule
        failed = {c["trial"] for c in result.checks if not c["ok"]}
        for t in _trials(memory, f"s{max_drop}"):
            values = set(t.params.values())
            if len(values) == 1 and t.user_attrs.get("images") == result.val_samples and t.number not in failed:
                a, e = t.user_attrs["accuracy"], t.user_attrs["energy_ratio"]
                assert not (a >= chosen.accuracy and e < chosen.energy_ratio), (t.number, a, e, chosen)


def test_candidates_prefer_a_dominating_shared_point():
    c = staged.Context(ann_accuracy=99.0, max_drop=1.0, n=100, groups=["a", "b"])
    c.target = 98.0
    blocks = staged.Candidate(trial=5, accuracy=98.5, energy_ratio=0.30, lam={"a": 0.2, "b": 0.3}, shared=False)
    shared = staged.Candidate(trial=2, accuracy=98.6, energy_ratio=0.30, lam={"a": 0.25, "b": 0.25}, shared=True)
    cheaper = staged.Candidate(trial=7, accuracy=98.2, energy_ratio=0.25, lam={"a": 0.2, "b": 0.4}, shared=False)
    assert [p.trial for p in staged.candidates([blocks, shared, cheaper], c)] == [7, 2]
    # a shared point that failed its neighbour check no longer excludes the points it dominates
    assert [p.trial for p in staged.candidates([blocks, shared, cheaper], c, frozenset({2}))] == [7, 5]


def test_when_the_cheapest_candidates_fail_the_cheapest_shared_lambda_that_holds_is_chosen():
    """Four per-block candidates beside a cliff fail their neighbour check: the search goes on with the shared
    λ left (cheapest first) instead of taking a failed point; only when none holds does it take the failed
    candidate with the most accurate neighbour."""
    c = staged.Context(ann_accuracy=99.0, max_drop=1.0, n=100, groups=["a", "b"])
    c.target = 98.0
    blocks = [staged.Candidate(trial=10 + k, accuracy=98.2, energy_ratio=0.20 + 0.01 * k,
                               lam={"a": 0.5 + 0.01 * k, "b": 0.3}, shared=False) for k in range(4)]
    shared = [staged.Candidate(trial=k, accuracy=98.5 + 0.1 * k, energy_ratio=0.40 + 0.05 * k,
                               lam={"a": 0.3 - 0.05 * k, "b": 0.3 - 0.05 * k}, shared=True) for k in range(3)]

    def evaluate(lam: dict, floor: float, holds=lambda lam: max(lam.values()) < 0.305) -> staged.Rung:
        acc = 98.6 if holds(lam) else 90.0        # past λ 0.305 in any group: off a cliff
        return staged.Rung(100, acc, 99.0, None, None, 0.3)

    p, rule, checks = staged.select(blocks + shared, c, evaluate)
    assert p.trial == 1 and p.shared and "cheapest shared λ that held" in rule   # 0.3 × 1.03 is past the cliff
    assert [k.trial for k in checks if not k.ok] == [10, 11, 12, 13, 0]
    p, rule, _ = staged.select(blocks + shared, c, lambda lam, floor: evaluate(lam, floor, lambda lam: False))
    assert not p.shared and "most accurate neighbour taken" in rule and "(7 checked)" in rule


@pytest.mark.parametrize("strategy", ["staged", "tpe"])
def test_neighbour_check_rejects_a_point_beside_a_cliff(cliff, digits, digits_mlp, strategy):
    """Either strategy's chosen point holds at its neighbours (the paper's TPE study too: its front is checked
    after the trials, cheapest first)."""
    cfg = _staged_cfg(search="shared", strategy=strategy, trials=16)
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    result = run_search(g, digits, cfg, {})
    chosen = result.chosen
    lam = max(chosen.lam.values())
    # the cheapest point within budget on the validation images sits just below the jump ...
    beside = [c for c in result.checks if not c["ok"]]
    assert beside and all(c["factor"] == 1 + staged.NEIGHBOUR for c in beside)
    # ... and is refused: the chosen point holds at λ × 1.03 as well
    assert lam * (1 + staged.NEIGHBOUR) < cliff["at"] and "cheaper point(s) failed at a neighbour" in chosen.rule
    assert result.checks[-1]["ok"] and result.checks[-1]["trial"] == chosen.trial


def test_pruning_makes_later_trials_use_fewer_images(memory, digits, digits_mlp):
    url = memory
    cfg = _staged_cfg(None, trials=30)
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    result = run_search(g, digits, cfg, {})
    n = result.val_samples
    trials = _trials(url)
    assert result.trials_completed == 30 == len(_completed(url, "s"))  # pruned trials count as trials
    images = [t.user_attrs["images"] for t in trials]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.user_attrs["images"] < n for t in pruned)
    assert all(t.user_attrs["images"] == n for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert images[0] == n                                     # the first point always runs on every image
    later = images[len(images) // 2:]
    assert sum(later) / len(later) < 0.8 * n                 # once there is an incumbent, poor points stop early
    assert result.images < 30 * n                             # trials and neighbour checks together


def test_staged_study_resumes_without_losing_trials(tmp_path, digits, digits_mlp):
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    cfg = _staged_cfg(url, trials=10)
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    first = {t.number: (t.state, t.params, t.user_attrs.get("images")) for t in _trials(url)}
    cfg.trials = 14
    result = run_search(g, digits, cfg, {})
    again = {t.number: (t.state, t.params, t.user_attrs.get("images")) for t in _trials(url)}
    assert result.trials_completed == 14 and len(_completed(url, "s")) == 14
    assert all(again[k] == v for k, v in first.items())      # nothing recomputed or lost
    shared = [tuple(t.params.values()) for t in _trials(url) if len(set(t.params.values())) == 1
              and t.user_attrs["stage"] in ("grid", "refine")]
    assert len(shared) == len(set(shared))                   # the rerun's plan went on where the first ended
    assert result.chosen is not None


def test_an_input_neuron_is_another_study(tmp_path, digits, digits_mlp):
    """The same storage, the input analog and then read by an input neuron: two networks, two studies (the
    second runs its own trials instead of reading the first's accuracies); auto resolves before the name."""
    from sfn_deploy.convert import convert
    url = f"sqlite:///{tmp_path / 'enc.db'}"
    runs = {enc: convert(digits_mlp, digits, trials=2, levels=8, storage=url, input_encoding=enc).search
            for enc in ("analog", "spikes", "auto")}
    assert runs["analog"]["study"] != runs["spikes"]["study"] == runs["auto"]["study"]   # auto: spikes (48 %)
    assert runs["spikes"]["trials_completed"] == 2 and runs["auto"]["trials_completed"] == 2    # auto reused it
    assert runs["analog"]["chosen"]["energy_ratio"] != runs["spikes"]["chosen"]["energy_ratio"]


def test_staged_and_tpe_studies_are_told_apart(tmp_path, digits, digits_mlp):
    url = f"sqlite:///{tmp_path / 'both.db'}"
    cfg = load_config("", {"trials": 2, "storage": url, "study": "s", "val_fraction": 0.3, "search": "per-site",
                           "strategy": "tpe"})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    cfg.strategy = "staged"
    with pytest.raises(UserError, match="made by the tpe search strategy"):
        run_search(g, digits, cfg, {})
    cfg.study = None                                          # derived names differ: no clash
    names = {tuning.study_name({}, cfg), tuning.study_name({}, load_config("", {"search": "per-site",
                                                                                 "strategy": "tpe"}))}
    assert len(names) == 2


def test_a_missed_budget_is_searched_again_with_more_levels(digits_mlp, digits):
    """No λ at M = 1 keeps the digits MLP within a point: the search runs again at levels_if_missed (M = 8), and
    the network keeps M = 8 and a point within the budget, recording the first search's best; with 0, M stays."""
    from sfn_deploy.convert import convert
    c = convert(digits_mlp, digits, max_drop=1.0, trials=8, levels=1, levels_if_missed=8, study="mine")
    s = c.search
    assert c.config["levels"] == s["levels"] == 8 and all(n.attrs["M"] == 8 for n in c.sites)
    assert s["study"] == "mine-levels8"                  # a named study is not reused for the other M
    assert s["chosen"]["accuracy"] >= s["ann_accuracy"] - 1.0
    assert s["missed"]["levels"] == 1 and s["missed"]["chosen"]["accuracy"] < s["ann_accuracy"] - 1.0
    kept = convert(digits_mlp, digits, max_drop=1.0, trials=8, levels=1, levels_if_missed=0)
    assert kept.config["levels"] == 1 and "missed" not in kept.search
    # no point within budget at M 1: the search took one beside the most accurate (staged.Context's relaxed rule)
    assert kept.search["chosen"]["accuracy"] < kept.search["ann_accuracy"] - 1.0


def test_without_a_budget_a_point_past_the_goal_is_searched_again(digits_mlp, digits):
    """Without --max-drop the goal is config.GOAL: at M = 1 the most accurate λ is further than that below the
    ANN, so the search runs again at M = 8 and keeps it (more accurate); the record names the goal and the CLI
    says it; at M = 8, already within the goal, nothing is searched again."""
    from sfn_deploy.cli import _describe_search
    from sfn_deploy.config import GOAL
    from sfn_deploy.convert import convert
    c = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=8, validate=True)
    s = c.search
    assert s["missed"]["goal"] == GOAL and s["missed"]["levels"] == 1
    assert s["missed"]["accuracy"] < c.metrics["ann_accuracy"] - GOAL      # what decided: after bias correction
    assert c.config["levels"] == s["levels"] == 8 and c.metrics["accuracy"] > s["missed"]["accuracy"]
    assert f"not within {GOAL:g} points of the ANN" in _describe_search(s)
    within = convert(digits_mlp, digits, trials=8, levels=8, levels_if_missed=12, input_encoding="analog")
    assert within.search["chosen"]["accuracy"] >= within.search["ann_accuracy"] - GOAL
    assert "missed" not in within.search and within.config["levels"] == 8


def _checked_as(monkeypatch, snn_for):
    """bias_correction.correct with the check's SNN predictions replaced by ``snn_for(graph, checked)``: the
    corrected result the retry sees, chosen by the test."""
    from dataclasses import replace

    from sfn_deploy import bias_correction
    real = bias_correction.correct

    def fake(graph, *a, **k):
        record, checked = real(graph, *a, **k)
        return record, replace(checked, snn=snn_for(graph, checked))
    monkeypatch.setattr(bias_correction, "correct", fake)


def test_the_second_search_is_decided_after_bias_correction(digits_mlp, digits, monkeypatch):
    """At M = 1 the search's point misses the goal; when the corrected result is within it (here: agreeing with
    the ANN everywhere), nothing is searched again."""
    from sfn_deploy.convert import convert
    _checked_as(monkeypatch, lambda graph, checked: checked.ann.clone())
    c = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=8)
    assert "missed" not in c.search and c.config["levels"] == 1


def test_a_worse_second_search_leaves_the_first_result_as_it_was(digits_mlp, digits, monkeypatch):
    """When the second search (and its correction) is no better, the network goes back to the first M, λ and
    corrected biases: the same outputs as a conversion that never retried."""
    from sfn_deploy.convert import convert
    from sfn_deploy.simulators.interpreter import run
    plain = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=0)
    _checked_as(monkeypatch, lambda graph, checked: checked.snn if graph.sites[0].attrs["M"] == 1
                else (checked.ann + 1) % 10)                  # the M = 8 result: wrong everywhere
    c = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=8)
    assert c.config["levels"] == 1 and c.search["missed"]["levels"] == 8 and c.search["missed"]["accuracy"] < 1
    assert c.search["chosen"] == plain.search["chosen"]
    assert c.metrics["bias_correction"] == plain.metrics["bias_correction"]
    x = digits.x[:200]
    assert torch.equal(run(c.graph, x), run(plain.graph, x))


def test_the_second_search_on_unlabeled_and_output_fidelity_data(digits_mlp, digits):
    """Without labels the result is scored by its agreement with the ANN's top-1, with output fidelity by the
    cosine (the ANN scores 100 either way): M = 1 misses the goal and is searched again at M = 8."""
    from sfn_deploy.config import GOAL
    from sfn_deploy.convert import convert
    from sfn_deploy.data import Dataset
    unlabeled = Dataset(digits.x, torch.full_like(digits.y, -1), name="digits, no labels")
    for kind in ("accuracy", "output"):
        c = convert(digits_mlp, unlabeled, trials=4, levels=1, levels_if_missed=8, fidelity=kind)
        missed = c.search["missed"]
        assert missed["levels"] == 1 and missed["accuracy"] < 100.0 - GOAL, kind


def test_levels_if_missed_defaults_to_12_unless_levels_is_given():
    assert load_config("", {"max_drop": 1.0}).levels_if_missed == 12
    assert load_config("", {"max_drop": 1.0, "levels": 8}).levels_if_missed == 0
    assert load_config("", {"levels": 6, "levels_if_missed": 10}).levels_if_missed == 10
    with pytest.raises(UserError, match="levels_if_missed"):
        load_config("", {"levels_if_missed": 17})


def test_fine_if_missed_is_the_last_step_unless_m_or_the_fire_function_was_chosen():
    from sfn_deploy.config import FINE_IF_MISSED
    from sfn_deploy.convert import ladder
    assert FINE_IF_MISSED == (16, "linear")
    assert ladder(load_config("", {})) == [(12, "sformer"), (16, "linear")]
    assert ladder(load_config("", {"max_drop": 1.0})) == [(12, "sformer"), (16, "linear")]
    assert ladder(load_config("", {"levels": 8})) == []
    assert ladder(load_config("", {"fire": "linear"})) == [(12, "linear")]   # 24 linear levels; M 16 linear: 32
    assert ladder(load_config("", {"fire": "linear", "fine_if_missed": True})) == [(12, "linear"), (16, "linear")]
    assert ladder(load_config("", {"levels_if_missed": 0})) == [(16, "linear")]
    assert ladder(load_config("", {"fine_if_missed": False})) == [(12, "sformer")]
    # a step is tried only with more linear levels than the tries before it (sformer M 16: 17)
    assert ladder(load_config("", {"levels": 16, "levels_if_missed": 12, "fine_if_missed": True})) == \
        [(16, "linear")]


def test_linear_levels_counts_the_gapless_start_of_the_fire_function():
    from sfn_deploy.neurons import linear_levels
    assert [linear_levels(m, "sformer") for m in (1, 8, 12)] == [2, 9, 13]
    assert linear_levels(16, "linear") == 32 and linear_levels(3, "exponential") == 2
    assert linear_levels(0, "linear") == 0


def test_still_short_after_more_levels_the_finest_step_is_tried_and_kept(digits_mlp, digits, monkeypatch):
    """M = 1 and M = 2 both miss the goal (their checked results made wrong everywhere): the ladder's last step,
    32 linear levels, runs, meets it and is kept: M, fire function and levels on every site, in the config, in
    the record of every try and in what the CLI prints."""
    from sfn_deploy.cli import _describe_search
    from sfn_deploy.convert import convert
    _checked_as(monkeypatch, lambda graph, checked: (checked.ann + 1) % 10 if graph.sites[0].attrs["M"] < 16
                else checked.ann.clone())
    c = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=2, fine_if_missed=True, study="mine")
    s = c.search
    assert c.config["levels"] == s["levels"] == 16 and c.config["fire"] == s["fire"] == "linear"
    assert all(n.attrs["M"] == 16 and n.attrs["fire"] == "linear" and max(n.attrs["levels"]) == 32 for n in c.sites
               if n.attrs["kind"] == "dual")
    assert [(t["levels"], t["fire"], t["kept"]) for t in s["tries"]] == \
        [(1, "sformer", False), (2, "sformer", False), (16, "linear", True)]
    assert s["missed"]["levels"] == 1 and s["study"] == "mine-levels16-linear"
    assert "searched again at M = 2: not within" in _describe_search(s)
    assert "searched again at M = 16 linear:" in _describe_search(s)


def test_when_every_step_misses_the_most_accurate_try_is_kept(digits_mlp, digits, monkeypatch):
    """Every try misses; M = 2's corrected result is the most accurate: the network goes back to it (M, fire
    function, λ and biases) from the finest step, and the record says so."""
    from sfn_deploy.cli import _describe_search
    from sfn_deploy.convert import convert
    from sfn_deploy.simulators.interpreter import run

    def wrong(graph, checked):
        m = graph.sites[0].attrs["M"]
        out = (checked.ann + 1) % 10
        if m == 2:
            out[:len(out) // 2] = checked.ann[:len(out) // 2]      # half right: the most accurate, still short
        return out
    _checked_as(monkeypatch, wrong)
    c = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=2, fine_if_missed=True)
    s = c.search
    assert [(t["levels"], t["kept"]) for t in s["tries"]] == [(1, False), (2, True), (16, False)]
    assert c.config["levels"] == 2 and c.config["fire"] == "sformer"
    assert all(n.attrs["M"] == 2 and n.attrs["fire"] == "sformer" for n in c.sites)
    assert "a later search at M = 16 linear was not within" in _describe_search(s)
    again = convert(digits_mlp, digits, trials=8, levels=1, levels_if_missed=2, fine_if_missed=False)
    assert again.search["chosen"] == c.search["chosen"]          # M = 2's point, as without the last step
    x = digits.x[:200]
    assert torch.equal(run(c.graph, x), run(again.graph, x))


def _check_drops(monkeypatch, points_at):
    """convert's check (``_Check.drop``) reads ``points_at(M)`` points instead of running the SNN."""
    import importlib

    from sfn_deploy.evaluation import PairedDrop
    conversion = importlib.import_module("sfn_deploy.convert")       # the package exports convert(), a function

    def fake(self, graph, batch_size):
        p = points_at(graph.sites[0].attrs["M"])
        return PairedDrop(points=p, low=p - 1, high=p + 1, confidence=0.95, n=len(self.data))
    monkeypatch.setattr(conversion._Check, "drop", fake)


def test_the_check_is_the_drop_on_images_the_search_did_not_choose_on(digits_mlp, digits):
    """600 validation images choose λ; the check's record is evaluate's drop on the next 1,000 of the same
    permutation, none of them validation images."""
    from sfn_deploy.convert import convert
    from sfn_deploy.evaluation import evaluate
    c = convert(digits_mlp, digits, trials=4, levels=8, val_size=600, check_size=1000, validate=True)
    check = c.search["check"]
    images, _ = digits.check_split(1000, 600)
    assert (check["samples"], check["available"], check["source"]) == (1000, 1797, "data")
    assert check["drop"]["points"] == pytest.approx(evaluate(c, images).drop.points)
    assert c.metrics["samples"] == 600 and "missed" not in c.search
    assert "check" not in convert(digits_mlp, digits, trials=4, levels=8, val_size=600, check_size=0).search
    # fewer images than resolve the goal (images_needed(0.5) = 765): no check
    assert "check" not in convert(digits_mlp, digits, trials=4, levels=8, val_size=600, check_size=700).search


def test_without_a_budget_a_miss_on_the_check_alone_climbs_the_ladder(digits_mlp, digits, monkeypatch):
    """Validation says M = 1 is within the goal (its corrected result agrees with the ANN everywhere), the check
    says 3 points: M = 2 is searched and kept, where the check reads 0.1; each try records its check drop."""
    from sfn_deploy.convert import convert
    _checked_as(monkeypatch, lambda graph, checked: checked.ann.clone())
    _check_drops(monkeypatch, lambda m: 3.0 if m == 1 else 0.1)
    c = convert(digits_mlp, digits, trials=4, levels=1, levels_if_missed=2, fine_if_missed=False, val_size=600,
                check_size=1000)
    s = c.search
    assert [(t["levels"], t["check_drop"], t["kept"]) for t in s["tries"]] == [(1, 3.0, False), (2, 0.1, True)]
    assert c.config["levels"] == 2 and s["check"]["drop"]["points"] == 0.1
    # every try misses the check: the one with the smallest check drop is kept, whatever validation says
    _check_drops(monkeypatch, lambda m: 2.0 if m == 1 else 4.0)
    c = convert(digits_mlp, digits, trials=4, levels=1, levels_if_missed=2, fine_if_missed=False, val_size=600,
                check_size=1000)
    assert c.config["levels"] == 1 and [t["kept"] for t in c.search["tries"]] == [True, False]
    assert c.search["check"]["drop"]["points"] == 2.0


def test_with_a_budget_a_miss_on_the_check_alone_is_reported_not_searched_again(digits_mlp, digits, monkeypatch):
    """With --max-drop every step takes the cheapest point within the budget on the same validation images, so a
    check miss repeats at every M (the bundled CNN: 0.50, 0.65, 0.65 at budget 0.3): it is recorded only."""
    from sfn_deploy.convert import convert
    _check_drops(monkeypatch, lambda m: 9.0)
    c = convert(digits_mlp, digits, trials=4, levels=8, levels_if_missed=12, max_drop=3.0, val_size=600,
                check_size=1000)
    assert "missed" not in c.search and c.config["levels"] == 8 and c.search["check"]["drop"]["points"] == 9.0
