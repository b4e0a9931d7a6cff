"""λ search: resumable, multi-worker, Pareto front and accuracy budget."""
import importlib
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

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

SLOW_WORKER = r"""
import os, sys, time
import importlib
import torch
torch.set_num_threads(1)
evaluation = importlib.import_module("sfn_deploy.evaluation")
import sfn_deploy.tuning as tuning
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
_measure = evaluation.measure
def slow_measure(graph, data, batch_size=256, spiking=True, **kw):
    if spiking:                              # one λ trial: tell the test, then take a while
        open({marker!r} + f".{{os.getpid()}}", "a").close()
        time.sleep({sleep})
    return _measure(graph, data, batch_size, spiking=spiking, **kw)
evaluation.measure = slow_measure
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


def _wait_started(tmp_path, proc, timeout=60):
    """Until ``proc`` is inside a λ trial (its marker file exists)."""
    marker = tmp_path / f"started.{proc.pid}"
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the worker never started a trial"
        time.sleep(0.05)


def _finish(proc, timeout):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the worker did not finish within {timeout} s")
    assert proc.returncode == 0, err.decode()[-2000:]


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
    _wait_started(tmp_path, victim)
    victim.kill()                                              # kill -9 mid-trial
    victim.wait()
    assert len(_states(url)[optuna.trial.TrialState.RUNNING]) == 1
    start = time.time()
    _finish(worker(url, trials=5, sleep=0), timeout=60)
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
    _wait_started(tmp_path, victim)
    _wait_started(tmp_path, survivor)
    victim.kill()
    victim.wait()
    _finish(survivor, timeout=60)
    _assert_finished(url, 8)


def test_dead_worker_on_another_machine_is_given_up_after_the_grace_period(tmp_path, worker):
    url = f"sqlite:///{tmp_path / 'remote.db'}"
    victim = worker(url, trials=4, sleep=1000, remote=True, heartbeat=(1, 2))
    survivor = worker(url, trials=4, sleep=0.1, heartbeat=(1, 2))
    _wait_started(tmp_path, victim)
    _wait_started(tmp_path, survivor)
    victim.kill()
    victim.wait()
    _finish(survivor, timeout=60)
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


def _on_measure(monkeypatch, action, at: int | None = None):
    """Wrap sfn_deploy.evaluation.measure (one trial's evaluation) to call action() on its spiking call number
    ``at`` (on every spiking call when None); return the real measure."""
    evaluation = importlib.import_module("sfn_deploy.evaluation")
    real, calls = evaluation.measure, []

    def measure(graph, data, batch_size=256, spiking=True, **kw):
        if spiking:
            calls.append(1)
            if at is None or len(calls) == at:
                action()
        return real(graph, data, batch_size, spiking=spiking, **kw)
    monkeypatch.setattr(evaluation, "measure", measure)
    return real


def _raise(e: BaseException):
    def action():
        raise e
    return action


def test_ctrl_c_fails_the_running_trial_and_propagates(tmp_path, digits, digits_mlp, monkeypatch):
    evaluation = importlib.import_module("sfn_deploy.evaluation")
    url = f"sqlite:///{tmp_path / 'int.db'}"
    cfg = load_config("", {"trials": 4, "storage": url, "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    real = _on_measure(monkeypatch, _raise(KeyboardInterrupt()), at=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(g, digits, cfg, {})
    states = _states(url)
    assert len(states[optuna.trial.TrialState.COMPLETE]) == 1
    assert len(states[optuna.trial.TrialState.FAIL]) == 1
    assert not states[optuna.trial.TrialState.RUNNING]
    monkeypatch.setattr(evaluation, "measure", real)
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
        _on_measure(monkeypatch, fail_running, at=2)
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
    _on_measure(monkeypatch, _raise(RuntimeError("boom")))
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
