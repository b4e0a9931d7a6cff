"""Networks rebuilt from published hardware deployments, to back-test `sfn-deploy report`.

`report` prices a network's exact operation counts with a target's per-operation figures. These builders rebuild
networks whose energy and/or latency per inference was *measured* on a chip (the measurements, their scope and
their sources are in published.toml, one [[backtest]] table per id). Converting a network here and running
`report` on the matching target gives a prediction to set against the measurement.

Each `build_<id>()` returns a dict:

- "model": a torch.nn.Module in eval mode, built only from Linear / Conv2d / ReLU / pooling / Flatten /
  Sequential so sfn-deploy can convert it. Weights are random but fixed (torch.manual_seed), not the trained ones:
  operation counts do not depend on them, activity does.
- "input_shape": the per-sample input shape (no batch axis). Vector inputs are given as C x 1 x 1 and flattened by
  the model's first layer, because sfn-deploy's data files are N x C x H x W.
- "timesteps": the timesteps per inference the deployment ran (informational; sfn-deploy is single-timestep).
  0 means the source does not say.
- "activity": the fraction of non-zero inputs/activations the source reports, or None if it reports none.
- "note": what is certain and what is assumed about the rebuild.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _finish(model: nn.Module, input_shape: tuple[int, ...], timesteps: int, activity: float | None,
            note: str) -> dict:
    return {"model": model.eval(), "input_shape": input_shape, "timesteps": timesteps, "activity": activity,
            "note": note}


def _kws_390_256_256_29() -> nn.Module:
    """Blouw et al. 2019's keyword spotter: 390 -> 256 -> 256 -> 29."""
    torch.manual_seed(1812_01739)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(390, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 29),
    )


def build_blouw2019_kws_loihi() -> dict:
    return _finish(
        _kws_390_256_256_29(), (390, 1, 1), 0, None,
        "Layer sizes quoted from the paper (390-d frame, two 256-d hidden layers, 29 outputs). On Loihi it ran as "
        "a rate-coded spiking network for an unstated number of timesteps; the activity was not reported.",
    )


def build_blouw2019_kws_gpu() -> dict:
    return _finish(
        _kws_390_256_256_29(), (390, 1, 1), 1, None,
        "Same network as the Loihi row, run as a dense TensorFlow graph at batch size 1 on a Quadro K4000.",
    )


def build_blouw2019_kws_movidius() -> dict:
    return _finish(
        _kws_390_256_256_29(), (390, 1, 1), 1, None,
        "Same network as the Loihi row, compiled for the Movidius Neural Compute Stick (fp16), batch size 1.",
    )


def build_lava_dl_pilotnet_lif_loihi2() -> dict:
    torch.manual_seed(2023_01_10)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, stride=2), nn.ReLU(),                             # 24 x 32 x 99
        nn.Conv2d(24, 36, 3, stride=2), nn.ReLU(),                            # 36 x 15 x 49
        nn.Conv2d(36, 48, 3, stride=2), nn.ReLU(),                            # 48 x 7 x 24
        nn.Conv2d(48, 64, 3, stride=(2, 1), padding=(1, 0)), nn.ReLU(),       # 64 x 4 x 22
        nn.Conv2d(64, 64, 3), nn.ReLU(),                                      # 64 x 2 x 20
        nn.Flatten(),
        nn.Linear(2560, 100), nn.ReLU(),
        nn.Linear(100, 50), nn.ReLU(),
        nn.Linear(50, 10), nn.ReLU(),
        nn.Linear(10, 1),
    )
    return _finish(
        model, (3, 66, 200), 16, None,
        "Layer shapes, strides and paddings from the netx table printed in lava-dl's pilotnet_snn benchmark "
        "notebook (W x H there; H x W here). Biases are assumed present. On Loihi 2 the input layer is a grid of "
        "LIF neurons driven by the pixels, and every layer spikes (binary LIF) over 16 timesteps per inference.",
    )


def _separable(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """Akida separable convolution: depthwise 3x3, pointwise 1x1, then ReLU."""
    return [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1), nn.ReLU()]


def build_akd1000_akidanet05_imagenet() -> dict:
    torch.manual_seed(1000)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),                  # conv_0      16 x 112 x 112
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),                           # conv_1      32 x 112 x 112
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),                 # conv_2      64 x 56 x 56
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),                           # conv_3      64 x 56 x 56
        *_separable(64, 128, stride=2),                                       # separable_4 128 x 28 x 28
        *_separable(128, 128),                                                # separable_5
        *_separable(128, 256, stride=2),                                      # separable_6 256 x 14 x 14
        *[m for _ in range(5) for m in _separable(256, 256)],                 # separable_7 .. 11
        *_separable(256, 512, stride=2),                                      # separable_12 512 x 7 x 7
        nn.Conv2d(512, 512, 3, padding=1, groups=512, bias=False),            # separable_13 ...
        nn.Conv2d(512, 512, 1),
        nn.AdaptiveAvgPool2d(1), nn.ReLU(),                                   # ... global average pool
        nn.Flatten(),
        nn.Linear(512, 1000),                                                 # classifier
    )
    return _finish(
        model, (3, 224, 224), 1, None,
        "Channels and output sizes from the layer table in BrainChip's Akida user guide (AkidaNet alpha 0.5, "
        "224x224). Assumed: downsampling in separable_4/6/12 by stride 2 (some akida_models versions use max "
        "pooling after the layer instead), pooling before the last ReLU, no batch norm (folded). Akida runs "
        "4-bit weights and activations in a single event-based pass.",
    )


def build_xylo_audio2_aloha() -> dict:
    torch.manual_seed(2406_15112)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 24), nn.ReLU(),
        nn.Linear(24, 24), nn.ReLU(),
        nn.Linear(24, 24), nn.ReLU(),
        nn.Linear(24, 1),
    )
    return _finish(
        model, (16, 1, 1), 0, None,
        "Only the 16 input channels (the audio front-end's filter bank) and the feed-forward SynNet form are "
        "sourced. The hidden sizes 24-24-24 and the single output are ASSUMED (Rockpool's Xylo Audio tutorial "
        "SynNet), not taken from the paper; its timestep and activity were not found.",
    )


BUILDERS: dict[str, Callable[[], dict]] = {
    "blouw2019_kws_loihi": build_blouw2019_kws_loihi,
    "blouw2019_kws_gpu": build_blouw2019_kws_gpu,
    "lava_dl_pilotnet_lif_loihi2": build_lava_dl_pilotnet_lif_loihi2,
    "akd1000_akidanet05_imagenet": build_akd1000_akidanet05_imagenet,
    "xylo_audio2_aloha": build_xylo_audio2_aloha,
    "blouw2019_kws_movidius": build_blouw2019_kws_movidius,
}
