"""The model zoo's rows (examples/zoo.py) as tests: every architecture captures to a graph that computes the
model exactly, converts, and exports to ONNX with the torch SNN's spike levels. Small configurations and a
few random images keep each row to seconds (random weights: fidelity on trained models is a benchmark)."""
import os
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import zoo  # noqa: E402

from sfn_deploy.convert import convert  # noqa: E402
from sfn_deploy.data import Dataset  # noqa: E402
from sfn_deploy.errors import UserError  # noqa: E402
from sfn_deploy.exporters.lava.plan import lower  # noqa: E402
from sfn_deploy.exporters.lava.reference import integer_reference, run_reference  # noqa: E402
from sfn_deploy.exporters.lava.validate import validate_plan  # noqa: E402
from sfn_deploy.exporters.onnx import OnnxRunner, to_onnx  # noqa: E402
from sfn_deploy.simulators.interpreter import run, run_with_levels  # noqa: E402

# architectures refused at capture, with the reason they are refused (a test checks the message)
REFUSED: dict[str, str] = {}
# every residual sum runs on cores in Lava (exporters/lava/plan.py, residual_sums)
RESIDUAL_ON_CORES = {"resnet20_cifar", "resnet18", "resnet50", "tv:resnet18", "regnetx_002", "mobilenetv2_100"}
# Lava plans refused, and why (none since linear layers and sites with the batch axis folded into windows, patches
# or heads, or moved by nn.MultiheadAttention's sequence-first computation, run on cores: sfn_deploy/samples.py)
LAVA_REFUSED: dict[str, str] = {}


def _data(n: int, size: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.rand(n, 3, size, size, generator=g), torch.zeros(n, dtype=torch.long), "random")


@pytest.mark.parametrize("name", sorted(zoo.ZOO) + zoo.SURVEY_IN_CI)
def test_zoo_row(name):
    warnings.filterwarnings("ignore")
    model, size = zoo.build(name)
    calib, test = _data(8, size, 0), _data(4, size, 1)
    with torch.no_grad():
        ref = model(test.x)
    if name in REFUSED:
        with pytest.raises(Exception, match=REFUSED[name]):
            convert(model, calib, scale=0.5)
        return
    converted = convert(model, calib, scale=0.5)
    g = converted.graph
    torch.testing.assert_close(run(g, test.x, spiking=False), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert g.sites, "no SFN was placed"
    snn, levels = run_with_levels(g, test.x)
    assert torch.isfinite(snn).all()
    logits, onnx_levels = OnnxRunner(to_onnx(converted, levels=True), threads=1).run_with_levels(test.x)
    same = sum(int((torch.as_tensor(onnx_levels[k]) == v).sum()) for k, v in levels.items())
    total = sum(v.numel() for v in levels.values())
    assert same >= 0.99 * total, f"ONNX spike levels agree on {same} of {total}"
    # the Lava plans (the processes are run by tests/test_lava.py) pass the bundle validator, and the fixed-point
    # one's integer reference runs with float32 arithmetic exact; every CNN's residual sums on cores
    if name in LAVA_REFUSED:
        with pytest.raises(UserError, match=LAVA_REFUSED[name]):
            lower(converted, "graded", "floating_pt")
        return
    for precision in ("floating_pt", "fixed_pt"):
        plan = lower(converted, "graded", precision, input_abs_max=1.0)
        validate_plan(plan)
    r = run_reference(integer_reference(converted, plan), test.x)
    assert r["float32_exact"] and np.isfinite(r["outputs"]).all()
    if name in RESIDUAL_ON_CORES:
        assert "add" not in plan.summary()["host_ops"] and plan.summary()["residual_sums"] > 0
