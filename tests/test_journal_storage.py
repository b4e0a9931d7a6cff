"""The λ search past one machine: several `sfn-deploy tune` workers on one Optuna journal file (the storage for a
shared file system, docs/cli.md "Many workers, many machines"), started here as real processes, and the same
against a real PostgreSQL server when one can be started. No mocks of the storage: the workers append to the
journal file (or talk to the server) as they would on N machines; "another machine" is imitated only where a
test says so, by giving a worker another process namespace, so that only its heartbeats tell whether it lives."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from click.testing import CliRunner
from conftest import SLOW_TRIALS, finish_worker, wait_started

from sfn_deploy.cli import main
from sfn_deploy.config import journal_path, load_config, storage_path
from sfn_deploy.convert import build_graph
from sfn_deploy.errors import UserError
from sfn_deploy.tuning import run_search

CLI = [sys.executable, "-m", "sfn_deploy.cli"]
STARTUP = 90                # seconds a worker may take to reach its first λ trial (the CLI's start-up included)
COMPLETE, RUNNING, FAIL, PRUNED, WAITING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                                            optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED,
                                            optuna.trial.TrialState.WAITING)


def _journal(path):
    """The journal as any Optuna program opens it (not through sfn-deploy)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _tune_args(model, storage, trials, *more):
    return ["tune", str(model), "--data", "sklearn:digits", "--val-fraction", "0.3", "--trials", str(trials),
            "--storage", str(storage), "--study", "s", "--json", *more]


def _states(storage, name="s"):
    trials = optuna.load_study(study_name=name, storage=storage).trials
    return {s: [t for t in trials if t.state == s] for s in optuna.trial.TrialState}


def _assert_finished(storage, n, dead=0):
    """Exactly n completed trials, each once, nothing left running, the dead trial(s) failed, no flood of pruned
    trials (WAITING trials are start points and retries still queued: they were never run)."""
    states = _states(storage)
    assert len(states[COMPLETE]) == n
    assert len({t.number for t in states[COMPLETE]}) == n
    # each enqueued point (the start grid, a dead trial's retry) was taken by one worker only
    queued = [json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in states[COMPLETE]
              if "fixed_params" in t.system_attrs and "failed_trial" not in t.system_attrs]
    assert len(set(queued)) == len(queued)
    assert not states[RUNNING]
    assert len(states[FAIL]) == dead
    assert len(states[PRUNED]) <= 2
    return states


def _front(storage, name="s"):
    """The Pareto front as `tune --json` reports it, read from the storage by Optuna itself."""
    study = optuna.load_study(study_name=name, storage=storage)
    return sorted(({"trial": t.number, "accuracy": t.values[0], "energy_ratio": t.values[1],
                    "lam": t.user_attrs["lam"]} for t in study.best_trials),
                  key=lambda p: (p["energy_ratio"], -p["accuracy"]))


# ---- the storage form -----------------------------------------------------------------------------------------

def test_a_path_ending_in_journal_is_a_journal_and_its_file_is_the_storage_path():
    assert journal_path("/shared/lam.journal") == storage_path("/shared/lam.journal") == "/shared/lam.journal"
    for other in ("study.db", "lam.journal.db", "sqlite:///x.journal", "postgresql://h/lam.journal", None, ""):
        assert journal_path(other) is None
    assert storage_path("sqlite:///x.journal") == "x.journal"          # a SQLite URL stays SQLite


# ---- N workers on one journal ---------------------------------------------------------------------------------

def _cli_workers(args: list[str], n: int) -> list[dict]:
    """Run ``n`` CLI workers with the same arguments at once; each one's --json result."""
    procs = [subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    return results


def test_three_cli_workers_share_one_journal_and_record_each_trial_once(tmp_path, worker):
    path = tmp_path / "lam.journal"
    # each trial takes at least 0.5 s, so one worker cannot finish the study while the others are still starting
    # (a digits trial alone takes under 0.1 s, a worker's start 2-3 s)
    results = [_result(p, timeout=300) for p in [worker(path, trials=10, sleep=0.5) for _ in range(3)]]
    storage = _journal(path)
    states = _assert_finished(storage, 10)
    front = _front(storage)
    for r in results:                         # every worker reports the study as Optuna reads it from the file
        assert r["trials_completed"] == 10 and r["storage"] == str(path) and r["study"] == "s"
        assert r["pareto_front"] == front
        assert r["chosen"] == results[0]["chosen"] and r["chosen"]["trial"] in {p["trial"] for p in front}
    # the trials were spread over the workers: each records its worker mark (pid) in the trial
    assert len({t.user_attrs["worker"]["pid"] for t in states[COMPLETE]}) >= 2
    # beside other workers each reseeds its sampler (tuning._reseed_beside_others): no λ is drawn twice
    lams = [tuple(sorted(t.params.items())) for t in states[COMPLETE]]
    assert len(set(lams)) == len(lams), lams
    assert not os.path.exists(f"{path}.lock")                 # the append lock is released


SLOW_CLI_WORKER = SLOW_TRIALS + r"""
from sfn_deploy.cli import main
if {remote}:                                 # pretend to run on another machine: only heartbeats tell
    tuning._namespace = lambda: "another-machine-" + str(os.getpid())
tuning.HEARTBEAT_INTERVAL, tuning.GRACE_PERIOD = {heartbeat}
main({args!r})
"""


@pytest.fixture
def worker(tmp_path, digits_pt2):
    """Start `sfn-deploy tune` (the real CLI, its trials slowed down) on the study ``s`` in ``storage``; whatever
    still runs at the end of the test is killed."""
    procs = []

    def start(storage, trials, sleep, remote=False, heartbeat=(10, 30)):
        code = SLOW_CLI_WORKER.format(marker=str(tmp_path / "started"), sleep=sleep, remote=remote,
                                      heartbeat=heartbeat, args=_tune_args(digits_pt2, storage, trials))
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
        return procs[-1]
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _result(proc, timeout) -> dict:
    return json.loads(finish_worker(proc, timeout))


def _kill_9(proc):
    proc.kill()                               # SIGKILL mid-trial
    proc.wait()


def test_rerun_after_kill_9_on_a_journal_finishes_with_exactly_n_trials(tmp_path, worker):
    path = tmp_path / "lam.journal"
    victim = worker(path, trials=5, sleep=1000)           # its first λ trial never ends
    wait_started(tmp_path, victim, STARTUP)
    _kill_9(victim)
    assert len(_states(_journal(path))[RUNNING]) == 1
    start = time.time()
    result = _result(worker(path, trials=5, sleep=0), timeout=90)
    # same machine: the dead process is seen at once, no waiting out the 30 s grace period
    assert time.time() - start < 60
    storage = _journal(path)
    states = _assert_finished(storage, 5, dead=1)
    assert result["trials_completed"] == 5 and result["pareto_front"] == _front(storage)
    dead = states[FAIL][0]
    # the dead trial's start point (λ 0.1, the first enqueued) is queued again, behind the rest of the grid
    assert [t.params for t in states[WAITING] if t.system_attrs.get("failed_trial") == dead.number] == [dead.params]


def test_two_workers_on_a_journal_one_killed_the_other_completes_the_study(tmp_path, worker):
    path = tmp_path / "lam.journal"
    victim = worker(path, trials=8, sleep=1000)
    survivor = worker(path, trials=8, sleep=0.2)
    wait_started(tmp_path, victim, STARTUP)
    wait_started(tmp_path, survivor, STARTUP)
    _kill_9(victim)
    result = _result(survivor, timeout=90)
    storage = _journal(path)
    _assert_finished(storage, 8, dead=1)
    assert result["trials_completed"] == 8 and result["pareto_front"] == _front(storage)


def test_dead_worker_on_another_machine_is_given_up_after_the_grace_period(tmp_path, worker):
    """No pid to check: the journal's heartbeat (sfn-deploy's own: Optuna has one for databases only) stops."""
    path = tmp_path / "remote.journal"
    victim = worker(path, trials=4, sleep=1000, remote=True, heartbeat=(1, 2))
    survivor = worker(path, trials=4, sleep=0.1, remote=True, heartbeat=(1, 2))
    wait_started(tmp_path, victim, STARTUP)
    wait_started(tmp_path, survivor, STARTUP)
    _kill_9(victim)
    finish_worker(survivor, timeout=90)
    states = _assert_finished(_journal(path), 4, dead=1)
    assert "sfn:heartbeat" in states[FAIL][0].system_attrs


def test_a_live_worker_on_another_machine_keeps_its_long_trial(tmp_path, worker):
    """Trials twice as long as the grace period: their heartbeats keep them, nothing is taken over."""
    path = tmp_path / "live.journal"
    a = worker(path, trials=3, sleep=4, remote=True, heartbeat=(1, 2))
    b = worker(path, trials=3, sleep=4, remote=True, heartbeat=(1, 2))
    finish_worker(a, timeout=120)
    finish_worker(b, timeout=120)
    _assert_finished(_journal(path), 3, dead=0)


# ---- refusals: the journal is untrusted input -----------------------------------------------------------------

def _refused(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _sqlite_file(path):
    import sqlite3
    with sqlite3.connect(path) as c:
        c.execute("create table t (x)")


@pytest.mark.parametrize("kind", ["text", "sqlite", "folder", "missing folder", "dangling link", "damaged"])
def test_what_is_not_a_journal_is_refused_in_one_line(tmp_path, digits_pt2, kind):
    path = tmp_path / "lam.journal"
    if kind == "text":
        path.write_text("my notes\n")
        expected = "not an Optuna journal file"
    elif kind == "sqlite":
        _sqlite_file(path)
        expected = "not an Optuna journal file"
    elif kind == "folder":
        path.mkdir()
        expected = "is a folder"
    elif kind == "missing folder":
        path = tmp_path / "nowhere" / "lam.journal"
        expected = "does not exist"
    elif kind == "dangling link":            # appending would create the link's target elsewhere
        path.symlink_to(tmp_path / "elsewhere.txt")
        expected = "symbolic link to a missing file"
    else:                                     # a journal record, then one Optuna cannot replay
        path.write_text('{"op_code":0,"worker_id":"w","study_name":"x","directions":[1]}\n'
                        '{"op_code":4,"worker_id":"w"}\n{"op_code":0}\n')
        expected = "not a valid Optuna journal"
    before = path.read_bytes() if path.is_file() else None
    line = _refused(*_tune_args(digits_pt2, path, 2)[:-1])
    assert str(path) in line and expected in line, line
    assert (path.read_bytes() if path.is_file() else None) == before          # left as it was
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "elsewhere.txt").exists()


def test_a_journal_that_is_an_input_or_the_output_is_refused(tmp_path, digits_pt2):
    path = tmp_path / "lam.journal"
    line = _refused(*_tune_args(digits_pt2, path, 2), "-o", path)
    assert str(path) in line and "--storage" in line, line
    config = tmp_path / "opts.journal"
    config.write_text("trials = 2\n")
    line = _refused(*_tune_args(digits_pt2, config, 2), "--config", config)
    assert str(config) in line and "--storage" in line and config.read_text() == "trials = 2\n", line


def test_a_damaged_record_in_the_middle_is_a_one_line_user_error(tmp_path, digits, digits_mlp):
    path = tmp_path / "lam.journal"
    cfg = load_config("", {"trials": 2, "storage": str(path), "study": "s", "val_fraction": 0.3})
    g = build_graph(digits_mlp, digits, cfg, quiet=True)
    run_search(g, digits, cfg, {})
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + b"{not json\n" + b"".join(lines[3:]))
    cfg.trials = 3
    with pytest.raises(UserError) as e:
        run_search(g, digits, cfg, {})
    msg = str(e.value)
    assert msg.startswith(f"--storage {path}:") and "\n" not in msg and "journal" in msg, msg


# ---- a real database server -----------------------------------------------------------------------------------

def _postgres_driver() -> str | None:
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg"),
                            ("pg8000", "postgresql+pg8000")):
        try:
            __import__(module)
        except ImportError:
            continue
        return dialect
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> list[str]:
    """The command prefix that runs the server: none, or as root PostgreSQL's own user (postgres and initdb
    refuse to run as root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    import pwd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root, and there is no user 'postgres' to run it as")
    if not shutil.which("runuser"):
        pytest.skip("PostgreSQL refuses to run as root, and runuser is not there to run it as user 'postgres'")
    return [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own (initdb, pg_ctl, its data in a new temporary folder), reached over TCP on
    127.0.0.1 without a password; its URL. Stopped and deleted at the end."""
    tools = {t: shutil.which(t) for t in ("initdb", "pg_ctl", "postgres")}
    if not all(tools.values()):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    dialect = _postgres_driver()
    if dialect is None:
        pytest.skip("no PostgreSQL driver for SQLAlchemy (psycopg2, psycopg or pg8000) in this environment")
    user = _server_user()
    folder = tempfile.mkdtemp(prefix="sfn-pg-")          # not under tmp_path: root's pytest folders are 0700
    if user:
        import pwd
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "server.log"), _free_port()
    pg_ctl = user + [str(tools["pg_ctl"]), "-D", data]
    try:
        subprocess.run(user + [str(tools["initdb"]), "-D", data, "-U", "sfn", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(pg_ctl + ["-l", log, "-w", "-t", "60", "-o", f"-p {port} -c listen_addresses=127.0.0.1 "
                                 "-c unix_socket_directories='' -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"{dialect}://sfn@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(pg_ctl + ["-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


OPEN_AT = r"""
import sys, time
import sfn_deploy.tuning as tuning
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
tuning._storage(sys.argv[2], 10, 30)
"""


def test_workers_started_together_on_an_empty_postgresql_database_all_open_it(postgres):
    """They race to create Optuna's tables: the losers retry instead of failing (it happened: duplicate key in
    pg_type for the enum studydirection)."""
    at = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(at), postgres], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]


def test_two_cli_workers_share_one_study_on_a_postgresql_server(postgres, digits_pt2):
    results = _cli_workers(_tune_args(digits_pt2, postgres, 8), 2)
    _assert_finished(postgres, 8)
    front = _front(postgres)
    assert all(r["trials_completed"] == 8 and r["pareto_front"] == front for r in results)


def test_postgresql_worker_killed_the_rerun_completes_the_study(postgres, worker, tmp_path):
    victim = worker(postgres, trials=4, sleep=1000)
    wait_started(tmp_path, victim, STARTUP)
    _kill_9(victim)
    result = _result(worker(postgres, trials=4, sleep=0), timeout=90)
    _assert_finished(postgres, 4, dead=1)
    assert result["trials_completed"] == 4 and result["pareto_front"] == _front(postgres)
