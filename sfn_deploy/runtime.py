"""Old import path of the reference interpreter, kept for callers not yet moved (the backends' evaluation
modules, the ONNX exporter's check, examples/). New code imports :mod:`sfn_deploy.simulators.interpreter`
(run, run_with_levels, Interpreter and its hooks) and :mod:`sfn_deploy.neurons` (the fire rule)."""
from .neurons import level_values, signed_table, spike_index, spike_levels
from .simulators.firegrid import fire
from .simulators.interpreter import run, run_with_levels

__all__ = ["fire", "level_values", "run", "run_with_levels", "signed_table", "spike_index", "spike_levels"]
