"""Simulators that read the converted network: exact operation counting (``counting``)."""
