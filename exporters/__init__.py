"""Exporters: each reads the converted network and writes a target form (ONNX, NIR, Lava).

Each module also holds its ``BACKEND`` (the :class:`sfn_deploy.backends.Exporter` that writes, runs back,
reports per-layer levels and tells ``inspect`` what it makes of a network); the registry that names them
is :data:`sfn_deploy.backends.BACKENDS`."""
