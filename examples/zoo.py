"""The model zoo coverage table: which popular architectures convert, run and export, and how faithfully.

    python examples/zoo.py                      # every row, writes docs/zoo.md (about half an hour on 2 cores)
    python examples/zoo.py resnet18 swin_tiny   # some rows, printed only
    python examples/zoo.py --one resnet18       # one row as JSON (what each subprocess runs)

Each architecture is built with random weights in a small configuration (reduced input size, and reduced
depth/width where the family allows it, listed in ``ZOO``) and run in its own process, so its time and peak
memory are its own. Calibration uses 256 CIFAR-10 training images and the SNN/ANN agreement 200 others
(``../shared/data/cifar10/train``, resized to the model's input, file k of every class in turn: random-weight
models make the labels meaningless, so only agreement is reported). λ is fixed (``--scale``, no search): this
table is about coverage; fidelity on trained models is in docs/zoo.md's second table.

Columns: convert (capture, calibration), agreement (top-1 SNN vs ANN on the reference interpreter),
energy ratio (paper convention, cmos45), ONNX (top-1 agreement with the torch SNN, and the share of spike
levels that are equal), Lava float / fixed (the Lava plan is built and its checks pass; the processes
are not run here), NIR (full graph, or why not), time and peak RSS of the whole row.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10", "train")

# name -> (constructor, keyword arguments of the small configuration, input size)
_VIT = {"img_size": 64, "depth": 2}
ZOO: dict[str, tuple[str, dict, int]] = {
    "resnet18": ("timm", {}, 64),
    "resnet50": ("timm", {}, 64),
    "resnet26d": ("timm", {}, 64),
    "resnext26ts": ("timm", {}, 64),
    "seresnet18": ("timm", {}, 64),
    "regnetx_002": ("timm", {}, 64),
    "regnety_002": ("timm", {}, 64),
    "densenet121": ("timm", {}, 64),
    "vgg11_bn": ("timm", {}, 32),
    "repvgg_a0": ("timm", {}, 64),
    "mobilenetv2_100": ("timm", {}, 64),
    "mobilenetv3_small_100": ("timm", {}, 64),
    "mobilenetv3_large_100": ("timm", {}, 64),
    "efficientnet_b0": ("timm", {}, 64),
    "efficientnet_lite0": ("timm", {}, 64),
    "mnasnet_100": ("timm", {}, 64),
    "ghostnet_100": ("timm", {}, 64),
    "convnext_atto": ("timm", {}, 64),
    "convnextv2_atto": ("timm", {}, 64),
    "poolformer_s12": ("timm", {}, 64),
    "mixer_b16_224": ("timm-mixer", {"img_size": 64, "patch_size": 16, "num_blocks": 2, "embed_dim": 768}, 64),
    "resmlp_12_224": ("timm-mixer", {"img_size": 64, "patch_size": 16, "num_blocks": 2, "embed_dim": 384,
                                     "mlp_ratio": 4, "resmlp": True}, 64),
    "deit_tiny_patch16_224": ("timm", _VIT, 64),
    "deit_tiny_distilled_patch16_224": ("timm", _VIT, 64),
    "vit_small_patch16_224": ("timm", _VIT, 64),
    "swin_tiny_patch4_window7_224": ("timm", {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)}, 64),
    "levit_128s": ("timm", {"img_size": 64}, 64),
    "efficientformer_l1": ("timm", {}, 224),
    "mobilevit_xxs": ("timm", {}, 64),
    "cait_xxs24_224": ("timm", {"img_size": 64, "depth": 2, "depth_token_only": 1}, 64),
    "eva02_tiny_patch14_224": ("timm", {"img_size": 56, "depth": 2}, 56),
    "tv:resnet18": ("torchvision", {}, 64),
    "tv:mobilenet_v2": ("torchvision", {}, 64),
    "tv:shufflenet_v2_x0_5": ("torchvision", {}, 64),
    "tv:squeezenet1_1": ("torchvision", {}, 64),
    "resnet20_cifar": ("local", {}, 32),
}

# Architectures outside the list, a user's choice rather than ours: run first on 2026-12-06 to find what
# breaks (13 of 43 were refused at capture; docs/zoo.md "Survey" says which and why), then the missing rules were
# added. `python examples/zoo.py --survey` regenerates that table; SURVEY_IN_CI run as tests too.
_V2 = {"img_size": 64, "depth": 2}
SURVEY: dict[str, tuple[str, dict, int]] = {
    "rexnet_100": ("timm", {}, 64), "lcnet_050": ("timm", {}, 64), "tinynet_e": ("timm", {}, 64),
    "dla34": ("timm", {}, 64), "cspresnet50": ("timm", {}, 64), "res2net50_14w_8s": ("timm", {}, 64),
    "resnest14d": ("timm", {}, 64), "nf_resnet26": ("timm", {}, 64), "dpn68": ("timm", {}, 64),
    "pvt_v2_b0": ("timm", {}, 64), "xcit_nano_12_p16_224": ("timm", _V2, 64),
    "pit_ti_224": ("timm", {"img_size": 64}, 64),
    "edgenext_xx_small": ("timm", {}, 64), "fastvit_t8": ("timm", {}, 64), "repvit_m0_9": ("timm", {}, 64),
    "efficientvit_b0": ("timm", {}, 64), "coat_lite_tiny": ("timm", {"img_size": 64}, 64),
    "gmlp_ti16_224": ("timm", {"img_size": 64}, 64), "beit_base_patch16_224": ("timm", _V2, 64),
    "tf_efficientnet_b0": ("timm", {}, 64), "mixnet_s": ("timm", {}, 64), "resnetv2_50": ("timm", {}, 64),
    "botnet26t_256": ("timm", {"img_size": 64}, 64), "mobileone_s0": ("timm", {}, 64),
    "ese_vovnet19b_dw": ("timm", {}, 64), "hrnet_w18_small": ("timm", {}, 64), "inception_v3": ("timm", {}, 96),
    "deit3_small_patch16_224": ("timm", _V2, 64), "vit_relpos_small_patch16_224": ("timm", _V2, 64),
    "tresnet_m": ("timm", {}, 64), "inception_next_tiny": ("timm", {}, 64),
    "twins_pcpvt_small": ("timm", {"img_size": 64}, 64),
    "tv:efficientnet_b0": ("torchvision", {}, 64), "tv:mobilenet_v3_small": ("torchvision", {}, 64),
    "tv:regnet_y_400mf": ("torchvision", {}, 64), "tv:resnext50_32x4d": ("torchvision", {}, 64),
    "tv:mnasnet0_5": ("torchvision", {}, 64), "tv:googlenet": ("torchvision", {"aux_logits": False,
                                                                             "init_weights": True}, 64),
    "tv:convnext_tiny": ("torchvision", {}, 64), "tv:vit_b_16": ("torchvision", {"image_size": 64}, 64),
    "tv:swin_t": ("torchvision", {}, 64), "tv:alexnet": ("torchvision", {}, 64), "tv:vgg11": ("torchvision", {}, 32),
}
# A second list, measured once after the survey's rules (commit 6000bf0) to see whether they generalise: no rule
# had been written for these (docs/zoo.md "Held-out survey" gives that first run; rules found missing by it were
# added afterwards, so it is no longer held out either). `python examples/zoo.py --held-out` regenerates it.
_V3 = {"img_size": 64}
HELD_OUT: dict[str, tuple[str, dict, int]] = {
    "ghostnetv2_100": ("timm", {}, 64), "hgnetv2_b0": ("timm", {}, 64), "convmixer_768_32": ("timm", {}, 64),
    "sequencer2d_s": ("timm", _V3, 64), "nest_tiny": ("timm", _V3, 64), "maxvit_nano_rw_256": ("timm", _V3, 64),
    "coatnet_nano_rw_224": ("timm", _V3, 64), "efficientformerv2_s0": ("timm", _V3, 64),
    "mobilevitv2_050": ("timm", {}, 64), "tiny_vit_5m_224": ("timm", {}, 224), "davit_tiny": ("timm", {}, 64),
    "focalnet_tiny_srf": ("timm", {}, 64), "gcvit_xxtiny": ("timm", _V3, 64), "starnet_s1": ("timm", {}, 64),
    "lambda_resnet26t": ("timm", _V3, 64), "halonet26t": ("timm", {}, 256), "sebotnet33ts_256": ("timm", _V3, 64),
    "cs3darknet_focus_s": ("timm", {}, 64), "darknet17": ("timm", {}, 64), "ecaresnet26t": ("timm", {}, 64),
    "skresnet18": ("timm", {}, 64), "gernet_s": ("timm", {}, 64), "regnetz_b16": ("timm", {}, 64),
    "resnetrs50": ("timm", {}, 64), "hardcorenas_a": ("timm", {}, 64), "mobilenetv4_conv_small": ("timm", {}, 64),
    "mobilenetv4_hybrid_medium": ("timm", {}, 64), "efficientvit_m0": ("timm", _V3, 64),
    "levit_conv_128s": ("timm", _V3, 64), "convformer_s18": ("timm", {}, 64), "caformer_s18": ("timm", {}, 64),
    "pvt_v2_b1": ("timm", {}, 64), "vit_small_patch16_rope_224": ("timm", _V2, 64), "fastvit_sa12": ("timm", {}, 64),
    "eva02_small_patch14_224": ("timm", {"img_size": 56, "depth": 2}, 56), "vitamin_small_224": ("timm", _V3, 64),
    "hiera_tiny_224": ("timm", _V3, 64), "mambaout_femto": ("timm", {}, 64),
    "tv:efficientnet_v2_s": ("torchvision", {}, 64), "tv:maxvit_t": ("torchvision", {}, 224),
    "tv:regnet_x_400mf": ("torchvision", {}, 64), "tv:shufflenet_v2_x1_0": ("torchvision", {}, 64),
    "tv:densenet121": ("torchvision", {}, 64), "tv:mobilenet_v3_large": ("torchvision", {}, 64),
    "tv:wide_resnet50_2": ("torchvision", {}, 64), "tv:swin_v2_t": ("torchvision", {}, 64),
    "tv:vit_b_32": ("torchvision", {"image_size": 64}, 64),
}
# one model per rule added for the survey (leaky ReLU, folded position encodings and XCA, attention masks,
# expand of a folded batch, reflect padding, in-place dropout, nearest upsampling, float32 autocast regions,
# nn.MultiheadAttention); torchvision's Swin (new_zeros masks) is left out: on the CI rows' 8 random calibration
# images one post-softmax level in 259,308 differs in ONNX (a softmax's last bit) and the flip spreads to 3 % of
# the levels, under the rows' 99 % (the survey table's CIFAR run: 99.95 %); tests/test_capture.py covers its rule
SURVEY_IN_CI = ["cspresnet50", "xcit_nano_12_p16_224", "beit_base_patch16_224", "botnet26t_256", "tresnet_m",
                "tv:mobilenet_v3_small", "hrnet_w18_small", "efficientvit_b0", "tv:vit_b_16"]


def build(name: str):
    """The model (eval mode, seed 0) and its input size."""
    import torch
    kind, kw, size = {**ZOO, **SURVEY, **HELD_OUT}[name]
    torch.manual_seed(0)
    if kind == "timm":
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    elif kind == "timm-mixer":      # the variant's own constructor fixes the depth: build the class directly
        from timm.models import mlp_mixer
        kw = dict(kw)
        if kw.pop("resmlp", False):
            kw.update(block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine)
        model = mlp_mixer.MlpMixer(num_classes=10, **kw)
    elif kind == "torchvision":
        import torchvision
        model = getattr(torchvision.models, name[3:])(num_classes=10, **kw)
    else:
        sys.path.insert(0, HERE)
        from architectures.resnet_cifar import resnet20
        model = resnet20(num_classes=10)
    return model.eval(), size


def cifar(n: int, size: int):
    """n CIFAR-10 training images at size×size in [0, 1]: file k of every class folder in turn (sorted), k = 0, 1, …"""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from sfn_deploy.data import Dataset
    classes = sorted(os.listdir(CIFAR))
    names = {c: sorted(os.listdir(os.path.join(CIFAR, c))) for c in classes}
    files = [(os.path.join(CIFAR, c, names[c][k]), i) for k in range(n // len(classes) + 1)
             for i, c in enumerate(classes)][:n]
    xs = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0 for p, _ in files])
    x = torch.from_numpy(xs)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return Dataset(x.contiguous(), torch.tensor([c for _, c in files]), f"cifar10[{n}]")


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


def one(name: str, scale: float, samples: int) -> dict:
    """Every column of one row; a failing stage records its one-line reason and the row goes on."""
    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from sfn_deploy.convert import convert
    from sfn_deploy.evaluation import evaluate
    t0 = time.time()
    row: dict = {"model": name}
    model, size = build(name)
    data = cifar(256 + samples, size)
    calib, test = data.subset(torch.arange(256)), data.subset(torch.arange(256, 256 + samples))
    batch = _batch(size)
    try:
        converted = convert(model, calib, scale=scale, quiet=True, batch_size=batch)
        row["convert"] = "yes"
        row["sites"] = len(converted.graph.sites)
    except Exception as e:
        row["convert"] = f"refused: {_short(e)}"
        row.update(seconds=round(time.time() - t0, 1), peak_mb=_peak_mb())
        return row
    res = evaluate(converted, test, quiet=True, batch_size=batch)
    row["agreement"] = round(res["agreement"], 1)
    row["energy_ratio"] = round(res["energy_ratio"], 3)
    row["onnx"] = _onnx(converted, test, batch)
    row["lava_float"] = _lava(converted, "floating_pt")
    row["lava_fixed"] = _lava(converted, "fixed_pt")
    row["nir"] = _nir(converted)
    row.update(seconds=round(time.time() - t0, 1), peak_mb=_peak_mb())
    return row


def _batch(size: int) -> int:
    """Images per batch: 224×224 rows hold a batch's activations (and ONNX's level outputs) at once; 256 of them
    took EfficientFormer-L1 past 23 GB."""
    return 256 if size <= 64 else 16


def _onnx(converted, test, batch: int) -> str:
    try:
        from sfn_deploy.exporters.onnx import OnnxRunner, to_onnx
        from sfn_deploy.simulators.interpreter import run_with_levels
        runner = OnnxRunner(to_onnx(converted, levels=True), threads=1)
        agree = same = total = 0
        for i in range(0, len(test), batch):
            x = test.x[i:i + batch]
            logits, levels = runner.run_with_levels(x)
            ref, ref_levels = run_with_levels(converted.graph, x)
            agree += int((torch_tensor(logits).argmax(-1) == ref.argmax(-1)).sum())
            same += sum(int((torch_tensor(levels[k]) == v).sum()) for k, v in ref_levels.items())
            total += sum(v.numel() for v in ref_levels.values())
        return f"{100.0 * agree / len(test):.1f} % top-1, {100.0 * same / max(total, 1):.2f} % levels"
    except Exception as e:
        return f"refused: {_short(e)}"


def torch_tensor(a):
    import torch
    return torch.as_tensor(a)


def _lava(converted, precision: str) -> str:
    """Whether the plan builds; for fixed point also what stays on the host (besides input and output) and how many
    residual sums run on cores."""
    try:
        from sfn_deploy.exporters.lava import lower
        plan = lower(converted, precision=precision, input_abs_max=converted.metrics.get("input_abs_max"))
    except Exception as e:
        return f"refused: {_short(e)}"
    if precision != "fixed_pt":
        return "plan ok"
    s = plan.summary()
    return (f"plan ok; {s['residual_sums']} residual sums on cores; host: {', '.join(s['host_ops']) or 'I/O only'}")


def _nir(converted) -> str:
    try:
        from sfn_deploy.exporters.nir import check_nir
        check_nir(converted.graph)
        return "full"
    except Exception as e:
        return _host_summary(str(e))


def _host_summary(message: str) -> str:
    """'partial: N host nodes (op ×k, ...)' from the NIR refusal, which groups the nodes by operation."""
    ops = re.findall(r"([a-z_0-9]+) ×(\d+)", message)
    total = re.search(r"(\d+) node\(s\)", message)
    if not ops or not total:
        return f"refused: {message.splitlines()[0][:100]}"
    more = ", …" if sum(int(k) for _, k in ops) < int(total.group(1)) else ""
    return f"partial: {total.group(1)} host nodes ({', '.join(f'{op} ×{k}' for op, k in ops)}{more})"


def _peak_mb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


COLUMNS = ["model", "convert", "agreement", "energy_ratio", "onnx", "lava_float", "lava_fixed", "nir", "seconds",
           "peak_mb"]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in COLUMNS) + " |\n"
                          for r in rows)


def main(argv: list[str]) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="rows to run (default: all, and write docs/zoo.md)")
    ap.add_argument("--one", help="run one row in this process and print it as JSON")
    ap.add_argument("--scale", type=float, default=0.5, help="the fixed λ (default 0.5)")
    ap.add_argument("--samples", type=int, default=200, help="images for the agreement columns (default 200)")
    ap.add_argument("--survey", action="store_true", help="the SURVEY rows (default: all, and write their section)")
    ap.add_argument("--held-out", action="store_true", help="the HELD_OUT rows (likewise)")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.scale, args.samples)))
        return
    names = args.names or list(SURVEY if args.survey else HELD_OUT if args.held_out else ZOO)
    rows = []
    for name in names:
        r = subprocess.run([sys.executable, __file__, "--one", name, "--scale", str(args.scale),
                            "--samples", str(args.samples)], capture_output=True, text=True)
        try:
            row = json.loads(r.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            row = {"model": name, "convert": f"crashed: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    if not args.names:
        doc, marks = (_SURVEY_DOC, _SURVEY_MARKS) if args.survey else (_HELD_OUT_DOC, _HELD_OUT_MARKS) \
            if args.held_out else (_DOC, _MARKS)
        write_section(os.path.join(ROOT, "docs", "zoo.md"), doc.format(table=table(rows), scale=args.scale,
                                                                       samples=args.samples), *marks)


_MARKS = ("<!-- coverage: generated by examples/zoo.py -->", "<!-- end of coverage -->")
_SURVEY_MARKS = ("<!-- survey: generated by examples/zoo.py --survey -->", "<!-- end of survey -->")
_HELD_OUT_MARKS = ("<!-- held-out: generated by examples/zoo.py --held-out -->", "<!-- end of held-out -->")


def write_section(path: str, text: str, start: str, end: str) -> None:
    """Replace a generated section of docs/zoo.md (or add it: the coverage first, the survey last), keeping the
    rest."""
    old = Path(path).read_text() if os.path.exists(path) else "# Model zoo\n"
    block = f"{start}\n{text.strip()}\n{end}\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + "\n" + rest.split(end, 1)[1].lstrip("\n")
    elif start != _MARKS[0]:
        new = old.rstrip("\n") + "\n\n" + block
    else:
        title, _, body = old.partition("\n")
        new = f"{title}\n\n{block}\n{body.lstrip()}"
    Path(path).write_text(new.rstrip("\n") + "\n")


_DOC = """## Coverage

Generated by `python examples/zoo.py` (random weights, small configurations: see `ZOO` in examples/zoo.py;
λ = {scale} fixed, 256 CIFAR-10 calibration images, agreement on {samples} others). The same
configurations run in CI as `tests/test_zoo.py`.

{table}
Lava columns: the Lava plan (process graph and fixed-point checks) is built; the processes are not run by
this script (`sfn-deploy simulate --backend lava` runs them). NIR: `full` means the whole graph is
expressible in NIR; otherwise `sfn-deploy export --target nir --partial` writes the spiking regions.
"""

_SURVEY_DOC = """## Survey: architectures outside the list

Generated by `python examples/zoo.py --survey` (as the coverage table: random weights, small configurations, see
`SURVEY` in examples/zoo.py; λ = {scale} fixed, 256 CIFAR-10 calibration images, agreement on {samples} others).
`SURVEY_IN_CI` of them run in CI with the coverage rows (`tests/test_zoo.py`).

{table}"""

_HELD_OUT_DOC = """## Held-out survey: whether the rules generalise

Generated by `python examples/zoo.py --held-out` (as the tables above; see `HELD_OUT` in examples/zoo.py;
λ = {scale} fixed, 256 CIFAR-10 calibration images, agreement on {samples} others).

{table}"""

if __name__ == "__main__":
    main(sys.argv[1:])
