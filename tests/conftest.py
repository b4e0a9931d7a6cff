import os
import subprocess
import time

import pytest
import torch
import torch.nn as nn

from sfn_deploy.data import load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.environ.get("SFN_MNIST", os.path.join(ROOT, "..", "shared", "data", "mnist"))
# the CIFAR-10 training JPEGs (CLASS/NNNN.jpg), as examples/train_cifar.py reads them
CIFAR_DIR = os.environ.get("SFN_CIFAR10_DIR", os.path.join(ROOT, "..", "shared", "data", "cifar10", "train"))
MODELS = os.path.join(ROOT, "examples", "models")


@pytest.fixture(scope="session")
def digits():
    pytest.importorskip("sklearn", reason="sklearn:digits needs scikit-learn (pip install 'sfn-deploy[digits]')")
    return load_data("sklearn:digits")


def train_digits_mlp(digits, seed=0):
    torch.manual_seed(seed)
    train, _ = digits.split(0.8, seed=0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(m(train.x), train.y).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="session")
def digits_mlp(digits):
    return train_digits_mlp(digits)


@pytest.fixture(scope="session")
def digits_pt2(digits_mlp, tmp_path_factory, digits):
    path = str(tmp_path_factory.mktemp("models") / "digits_mlp.pt2")
    ep = torch.export.export(digits_mlp, (digits.x[:2],),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, path)
    return path


@pytest.fixture(scope="session")
def mnist_dir():
    if not os.path.exists(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("shared MNIST data not found (set SFN_MNIST)")
    return MNIST_DIR


def convert_example(name: str, mnist_dir: str, calib: int = 500, scale: float = 0.2, test: int = 40):
    """A bundled example model converted at a fixed λ on the first ``calib`` MNIST images, and the first
    ``test`` test images (8000..)."""
    from sfn_deploy.convert import convert
    from sfn_deploy.models import load_model
    model, ident = load_model(os.path.join(MODELS, f"{name}.pt2"))
    snn = convert(model, load_data(f"mnist:{mnist_dir}:0:{calib}"), scale=scale, source=ident)
    return snn, load_data(f"mnist:{mnist_dir}:8000:{8000 + test}")


# The start of a λ-search worker script (str.format fields: marker, sleep): every evaluation of a λ point
# (staged.Evaluator.run: a trial or a neighbour check) first writes the marker file marker.PID, which
# wait_started watches for, then sleeps.
SLOW_TRIALS = r"""
import importlib, os, sys, time
import torch
torch.set_num_threads(1)
staged = importlib.import_module("sfn_deploy.staged")
import sfn_deploy.tuning as tuning
_run = staged.Evaluator.run
def slow_run(self, lam):                     # one λ point: tell the test, then take a while
    open({marker!r} + f".{{os.getpid()}}", "a").close()
    time.sleep({sleep})
    yield from _run(self, lam)
staged.Evaluator.run = slow_run
"""


def finish_worker(proc, timeout) -> bytes:
    """The stdout of a worker process that must exit 0 within ``timeout`` s (killed, and the test failed, if not)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the worker did not finish within {timeout} s")
    assert proc.returncode == 0, err.decode()[-2000:]
    return out


def wait_started(tmp_path, proc, timeout=60):
    """Until the worker ``proc`` is inside a λ trial (the marker file ``started.PID`` its slowed-down measure
    writes exists)."""
    marker = tmp_path / f"started.{proc.pid}"
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the worker never started a trial"
        time.sleep(0.05)

