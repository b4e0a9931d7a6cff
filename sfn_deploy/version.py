"""The package version, in a module of its own so that modules the package imports (model_file, the
ONNX exporter) can read it without importing the package ``__init__`` that imports them."""
__version__ = "0.1.0"       # keep equal to pyproject.toml's version
