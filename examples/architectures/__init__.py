"""Architectures defined here rather than taken from timm/torchvision (for the zoo and training examples)."""
