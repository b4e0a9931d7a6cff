"""The registries resolve: every method names an apply function, every backend loads and follows the protocol,
and the pipeline inspect shows is the one convert runs."""
import subprocess
import sys

from sfn_deploy import backends
from sfn_deploy.convert import PIPELINE
from sfn_deploy.methods import METHODS

BACKEND_ATTRS = ("runs_ann", "one_stream", "runner", "layers", "split_time", "details", "parity_info")
EXPORTER_ATTRS = ("writes_folder", "export", "describe_export", "support")


def test_every_method_names_a_callable_apply():
    assert list(METHODS) == ["sfn", "if", "mtn", "ecmt", "pmsm", "mbe"]
    for m in METHODS.values():
        assert callable(m.load()), m.name


def test_every_backend_loads_and_follows_the_protocol():
    assert backends.names() == ["torch", "onnx", "nir", "lava"]
    assert backends.export_targets() == ["onnx", "nir", "lava"]
    for name in backends.names():
        b = backends.get(name)
        assert all(hasattr(b, a) for a in BACKEND_ATTRS), name
        if name in backends.export_targets():
            assert all(hasattr(b, a) for a in EXPORTER_ATTRS), name


def test_pipeline_is_what_inspect_shows():
    assert [p.name for p in PIPELINE] == ["capture", "fold_batchnorm", "insert_sfn", "calibrate", "scale",
                                          "bias_correction", "more_levels"]
    assert all(callable(p.run) and p.description for p in PIPELINE)


def test_help_imports_no_heavy_backend():
    code = ("import sys, sfn_deploy.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('onnxruntime', 'lava', 'nir', 'optuna', 'sfn_deploy.exporters.onnx') "
            "if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
