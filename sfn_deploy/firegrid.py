"""Old import path of the compiled fire tables, kept for examples/bench_simulator.py: they live in
:mod:`sfn_deploy.simulators.firegrid`."""
from .simulators.firegrid import FireGrid, cache_path, fire, grid_for, native

__all__ = ["FireGrid", "cache_path", "fire", "grid_for", "native"]
