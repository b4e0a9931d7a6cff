"""Exporters: each reads the converted network and writes a target form (ONNX, NIR, Lava)."""
