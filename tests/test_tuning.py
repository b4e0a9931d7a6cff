"""λ search: resumable, multi-worker, Pareto front and accuracy budget."""
import os
import subprocess
import sys

import optuna
import pytest

from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.tuning import choose, run_search, site_groups


def _completed(storage, name):
    s = optuna.load_study(study_name=name, storage=storage)
    return [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]


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
    assert len(again) == 12 and result["trials_completed"] == 12
    assert all(again[k] == v for k, v in first.items())      # nothing recomputed or lost


WORKER = r"""
import sys
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
sys.path.insert(0, {tests!r})
from conftest import train_digits_mlp
from sfn_deploy.tuning import run_search
d = load_data("sklearn:digits")
cfg = load_config("", dict(trials=14, storage={url!r}, study="shared", val_fraction=0.3, search="per-block"))
g = build_graph(train_digits_mlp(d), d, cfg, quiet=True)
run_search(g, d, cfg, {{}})
"""


def test_two_workers_share_one_study_and_record_each_trial_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    code = WORKER.format(tests=os.path.dirname(__file__), url=url)
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
    result = {"ann_accuracy": 98.0, "pareto_front": [
        {"trial": 1, "accuracy": 98.2, "energy_ratio": 0.30, "lam": {}},
        {"trial": 2, "accuracy": 97.8, "energy_ratio": 0.20, "lam": {}},
        {"trial": 3, "accuracy": 96.0, "energy_ratio": 0.10, "lam": {}}]}
    assert choose(result, None)["trial"] == 1
    assert choose(result, 0.3)["trial"] == 2
    assert choose(result, 2.5)["trial"] == 3
    assert choose(result, 0.0)["trial"] == 1       # only trial 1 is within 0 points


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
