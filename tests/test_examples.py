"""The bundled example models on real MNIST: conversion keeps the accuracy the docs claim (small samples)."""
import os

import pytest
from conftest import MODELS

from sfn_deploy import convert, evaluate, load_data, load_model


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_data(f"mnist:{mnist_dir}:0:1500"), load_data(f"mnist:{mnist_dir}:8000:9000")


def test_bundled_models_reproduce_their_recorded_accuracy(mnist_dir):
    import json
    test = load_data(f"mnist:{mnist_dir}:8000:10000")
    for name in ("mnist_cnn", "mnist_vit"):
        with open(os.path.join(MODELS, f"{name}.json")) as f:
            meta = json.load(f)
        model, _ = load_model(os.path.join(MODELS, f"{name}.pt2"))
        import torch
        pred = torch.cat([model.module()(xb).argmax(-1) for xb in test.batches(500)])   # exported for ≤ 1024
        acc = 100 * float((pred == test.y).float().mean())
        assert abs(acc - 100 * meta["test_accuracy"]) < 0.01


def test_mnist_cnn_converts_within_half_a_point_at_low_energy(mnist):
    train, test = mnist
    model, ident = load_model(os.path.join(MODELS, "mnist_cnn.pt2"))
    snn = convert(model, train, scale=0.15, source=ident)
    r = evaluate(snn, test)
    assert r["ann_accuracy"] > 98.5
    assert r["accuracy"] >= r["ann_accuracy"] - 0.5
    assert r["energy_ratio"] < 0.2
    assert r["agreement"] > 98.5


def test_mnist_vit_converts_with_all_transformer_sites(mnist):
    train, test = mnist
    model, ident = load_model(os.path.join(MODELS, "mnist_vit.pt2"))
    snn = convert(model, train.limit(500), scale=0.2, rounding="nearest", source=ident)
    roles = {s.attrs["role"] for s in snn.sites}
    assert roles == {"pre-qkv", "q", "k", "v", "post-softmax", "attn-out", "pre-fc1", "post-gelu", "pre-head"}
    r = evaluate(snn, test.limit(500))
    assert r["ann_accuracy"] > 94
    assert r["accuracy"] >= r["ann_accuracy"] - 2.5
