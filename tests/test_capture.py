"""Graph capture: the IR run as an ANN equals the source model, for modules, timm ViTs and .pt2 files."""
import pytest
import timm
import torch
import torch.nn as nn

from sfn_deploy.capture import capture
from sfn_deploy.errors import UnsupportedOpsError, UserError
from sfn_deploy.passes import fold_batchnorm
from sfn_deploy.simulators.interpreter import run


def small_vit(**kw):
    args = dict(num_classes=10, img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(16 * 3 * 3, 10))
    for mod in m.modules():        # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    return m.eval()


@pytest.mark.parametrize("make", [cnn, small_vit])
def test_ir_equals_model_for_other_batch_sizes(make):
    torch.manual_seed(1)
    m = make()
    g = capture(m, torch.randn(2, 1, 28, 28))
    for b in (1, 3, 17):
        x = torch.randn(b, 1, 28, 28)
        torch.testing.assert_close(run(g, x, spiking=False), m(x), rtol=1e-5, atol=1e-5)


def test_attention_is_split_into_products_and_softmax():
    g = capture(small_vit(depth=1), torch.randn(2, 1, 28, 28))
    ops = [n.op for n in g.nodes]
    assert ops.count("matmul") == 2 and ops.count("softmax") == 1
    assert not any("scaled_dot_product" in n.op for n in g.nodes)


@pytest.mark.parametrize("batch", [1, 2])
def test_pt2_with_static_batch_runs_at_any_batch(tmp_path, batch):
    m = small_vit()
    ep = torch.export.export(m, (torch.randn(batch, 1, 28, 28),))
    torch.export.save(ep, tmp_path / "m.pt2")
    g = capture(torch.export.load(tmp_path / "m.pt2"))
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(run(g, x, spiking=False), m(x), rtol=1e-5, atol=1e-5)


def test_pt2_with_dynamic_batch():
    m = cnn()
    ep = torch.export.export(m, (torch.randn(4, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("b")},))
    g = capture(ep)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(run(g, x, spiking=False), m(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_folding_is_exact_and_removes_the_nodes():
    m = cnn()
    x = torch.randn(4, 1, 28, 28)
    g = fold_batchnorm(capture(m, x))
    assert not any(n.op == "batch_norm" for n in g.nodes)
    torch.testing.assert_close(run(g, x, spiking=False), m(x), rtol=1e-5, atol=1e-5)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Hardshrink()

    def forward(self, x):
        return torch.sin(torch.floor(self.act(self.fc(x.flatten(1))))) * 2


def test_unsupported_operations_are_listed_at_once_with_location():
    with pytest.raises(UnsupportedOpsError) as info:
        capture(Odd(), torch.randn(2, 1, 2, 2))
    problems = info.value.problems
    assert len(problems) == 2
    assert "floor" in problems[0] and "test_capture.py" in problems[0]
    assert "sin" in problems[1] and "test_capture.py" in problems[1]


class ZooOps(nn.Module):
    """One module using the zoo's operator families: each must capture to a graph computing the same values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(2, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.bias_table = nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", torch.randint(0, 9, (4, 4)))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = nn.functional.relu6(self.conv(x))                                  # hardtanh
        h = nn.functional.hardswish(self.dw(h)) + nn.functional.silu(h) * torch.sigmoid(h)
        h = self.gn(nn.functional.hardsigmoid(h) * torch.tanh(h) + nn.functional.mish(h))
        h = torch.addcmul(h, self.gamma, h)                                    # ResMLP's affine
        h = h + h / (torch.linalg.vector_norm(h, 2, dim=(2, 3), keepdim=True) + 1e-6)     # ConvNeXt-V2 GRN
        h = torch.roll(nn.functional.pad(h, (0, 0, 0, 0, 2, 2)), shifts=(1, -1), dims=(2, 3))   # 12 channels
        a, b, c = torch.split(h, [4, 4, 4], dim=1)
        h = torch.stack([a, -b, c.clamp(min=0)], dim=2).sum(2)                  # 4 channels
        n, ch, hh, ww = h.shape                                                # windows folded into the batch
        win = h.reshape(n, ch, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, ch, 2, 2)
        bias = self.bias_table[self.index.flatten()].reshape(4, 4, 2)[..., 0]  # a gather from a parameter table
        win = win + bias[None, None, :2, :2]
        h = win.reshape(n, hh // 2, ww // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch, hh, ww)
        h = torch.cat([h, h.chunk(2, dim=1)[0]], dim=1)                        # 6 channels
        return self.fc(nn.functional.pad(h.mean((2, 3)), (1, 1)))


def test_zoo_operator_families_capture_exactly():
    m = ZooOps().eval()
    g = capture(m, torch.randn(2, 3, 8, 8))
    ops = {n.op for n in g.nodes}
    assert {"hardtanh", "hardswish", "silu", "sigmoid", "hardsigmoid", "tanh", "mish", "group_norm", "vector_norm",
            "pad", "roll", "sum"} <= ops
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(run(g, x, spiking=False), m(x), rtol=1e-5, atol=1e-5)


def exact_at_batches(g, m, shape: tuple, batches: tuple, tol: float | None = None) -> None:
    """The captured graph computes the model at batch sizes other than the example's."""
    for b in batches:
        x = torch.randn(b, *shape)
        torch.testing.assert_close(run(g, x, spiking=False), m(x), rtol=tol, atol=tol)


class FoldedExpand(nn.Module):
    """BotNet's relative logits: heads folded into the batch axis, then broadcast along another axis."""

    def forward(self, x):                       # x: (B, 8, 4)
        h = x.reshape(-1, 4, 1, 4)              # (B·2, 4, 1, 4)
        h = h.expand(-1, -1, 3, -1) * 2         # the folded batch axis kept
        return h.reshape(x.shape[0], 96)


@pytest.mark.parametrize("dynamic", [False, True])
def test_expand_keeps_a_batch_axis_with_items_folded_in(dynamic):
    m = FoldedExpand()
    ep = torch.export.export(m, (torch.randn(2, 8, 4),),
                             dynamic_shapes=({0: torch.export.Dim("b")},) if dynamic else None)
    g = capture(ep)
    exact_at_batches(g, m, (8, 4), (1, 2, 5))


class MaskedAttention(nn.Module):
    """Fused attention with a stored float bias (BEiT's relative position bias), a stored boolean mask, or causal."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.qkv = kind, nn.Linear(8, 24)
        self.register_buffer("bias", torch.randn(2, 5, 5))
        self.register_buffer("allowed", torch.rand(5, 5) > 0.3)

    def forward(self, x):                                   # x: (B, 5, 8)
        q, k, v = self.qkv(x).reshape(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        kw = {"float": {"attn_mask": self.bias}, "bool": {"attn_mask": self.allowed},
              "causal": {"is_causal": True}}[self.kind]
        return nn.functional.scaled_dot_product_attention(q, k, v, **kw).flatten(1)


@pytest.mark.parametrize("kind", ["float", "bool", "causal"])
def test_attention_masks_become_an_additive_constant_before_the_softmax(kind):
    m = MaskedAttention(kind).eval()
    g = capture(m, torch.randn(2, 5, 8))
    assert [n.op for n in g.nodes].count("softmax") == 1 and any(n.name.endswith("_mask") for n in g.nodes)
    exact_at_batches(g, m, (5, 8), (1, 3), 1e-5)


class PositionEncoding(nn.Module):
    """EdgeNeXt / XCiT style: a sine encoding built at run time from zeros(B, H, W), arange and cumsum, then a
    1×1 conv, repeated over the batch; F.normalize (clamp_min, expand_as); a leaky ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, x):                                   # x: (B, 4, 3, 3)
        b, _, h, w = x.shape
        mask = ~torch.zeros(b, h, w, dtype=torch.bool)
        y = mask.cumsum(1, dtype=torch.float32)
        t = 10000 ** (2 * (torch.arange(4, dtype=torch.float32) // 2) / 4)
        pos = torch.cat([(y[..., None] / t).sin(), (y[..., None] / t).cos()], dim=3).permute(0, 3, 1, 2)
        pe = self.proj(pos)
        fixed = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3).repeat(b, 4, 1, 1)
        h = nn.functional.leaky_relu(x + pe + 0.1 * fixed, 0.1)
        return nn.functional.normalize(h.flatten(1), dim=-1)


def test_input_independent_tensors_fold_and_broadcast_over_the_batch():
    m = PositionEncoding().eval()
    g = capture(m, torch.randn(2, 4, 3, 3))
    assert "leaky_relu" in {n.op for n in g.nodes}
    exact_at_batches(g, m, (4, 3, 3), (1, 2, 5), 1e-5)


class MHA(nn.Module):
    """nn.MultiheadAttention (torchvision's ViT): sequence-first inside, so reshapes fold the batch inside the
    sequence axis (``view(tgt_len * bsz, embed)``) as well as heads into it."""

    def __init__(self, batch_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):                                   # x: (B, 5, 8)
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        return (h if self.batch_first else h.transpose(0, 1)).flatten(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_captures_exactly(batch_first):
    m = MHA(batch_first).eval()
    g = capture(m, torch.randn(2, 5, 8))
    assert [n.op for n in g.nodes].count("softmax") == 1
    exact_at_batches(g, m, (5, 8), (1, 3, 4), 1e-5)


class ShiftMask(nn.Module):
    """torchvision Swin's shifted-window mask: built on x.new_zeros, filled slice by slice, compared, masked."""

    def forward(self, x):                                   # x: (B, 4, 4)
        mask = x.new_zeros((4, 4))
        mask[:2, :] = 1.0
        mask[:, 3:] += 2.0
        bias = (mask.reshape(16, 1) - mask.reshape(1, 16)).ne(0).float().masked_fill(mask.reshape(16, 1) == 3, -5.0)
        return (x.reshape(x.shape[0], 16, 1) + bias).softmax(-1).flatten(1) + torch.zeros_like(x).flatten(1).sum(1,
                                                                                                      keepdim=True)


def test_tensors_of_the_inputs_shape_only_fold():
    m = ShiftMask().eval()
    g = capture(m, torch.randn(2, 4, 4))
    exact_at_batches(g, m, (4, 4), (1, 3))


class Float32Region(nn.Module):
    """EfficientViT's linear attention: a region forced to float32 with torch.autocast(enabled=False)."""

    def __init__(self, enabled: bool):
        super().__init__()
        torch.manual_seed(0)
        self.enabled, self.fc = enabled, nn.Linear(6, 6)

    def forward(self, x):                                   # x: (B, 4, 6)
        h = torch.relu(self.fc(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            a = h.float() @ h.float().transpose(1, 2)
            y = a / (a.sum(-1, keepdim=True) + 1e-5)
        return self.fc(y @ h).flatten(1)


def test_float32_autocast_regions_are_inlined_and_mixed_precision_refused():
    m = Float32Region(False).eval()
    ep = torch.export.export(m, (torch.randn(2, 4, 6),))
    before = len(ep.graph.nodes)
    g = capture(ep)
    assert len(ep.graph.nodes) == before                  # the user's program is left as it was
    exact_at_batches(g, m, (4, 6), (1, 3))
    with pytest.raises(UnsupportedOpsError, match="mixed-precision autocast region"):
        capture(Float32Region(True).eval(), torch.randn(2, 4, 6))


def signal_cnn():
    """A keyword-spotting-style 1-D CNN: Conv1d, BatchNorm1d, pooling, a depthwise Conv1d, adaptive pooling."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
                      nn.Conv1d(8, 8, 3, groups=8, dilation=2), nn.ReLU(), nn.AvgPool1d(2), nn.Conv1d(8, 16, 1),
                      nn.ReLU(), nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(48, 4))
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


def test_one_dimensional_layers_run_as_their_two_dimensional_forms():
    m = signal_cnn()
    g = fold_batchnorm(capture(m, torch.randn(2, 2, 64)))
    ops = [n.op for n in g.nodes]
    assert ops.count("conv2d") == 3 and "batch_norm" not in ops
    assert ops.count("unsqueeze") == 1 and "squeeze" not in ops          # the input gets its row axis, once
    exact_at_batches(g, m, (2, 64), (1, 3), 1e-5)


class EinsumAttention(nn.Module):
    """Attention written with einsum (custom attention code): decomposed by torch.export's own rule first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):                                   # x: (B, 5, 8)
        q, k, v = self.qkv(x).reshape(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = (torch.einsum("bhid,bhjd->bhij", q, k) * 0.5).softmax(-1)
        return self.out(torch.einsum("bhij,bhjd->bhid", a, v).transpose(1, 2).flatten(2)).flatten(1)


def test_einsum_is_decomposed_and_its_products_get_sites():
    from sfn_deploy.passes import insert_sfn
    m = EinsumAttention().eval()
    ep = torch.export.export(m, (torch.randn(2, 5, 8),))
    g = capture(ep)
    assert any(n.target is torch.ops.aten.einsum.default for n in ep.graph.nodes)     # the user's program kept
    assert [n.op for n in g.nodes].count("matmul") == 2
    exact_at_batches(g, m, (5, 8), (1, 3))
    roles = {s.attrs["role"] for s in insert_sfn(g).sites}
    assert {"q", "k", "v", "post-softmax", "attn-out"} <= roles


class SizeAssert(nn.Module):
    def forward(self, x):
        torch._assert(x.shape[-1] % 7 == 0, "")          # timm's form (pytest rewrites a bare assert)
        return x.flatten(1)


def test_a_model_failing_its_own_check_is_refused_with_where_it_failed():
    with pytest.raises(UserError, match=r"AssertionError with no message at test_capture\.py:\d+"):
        capture(SizeAssert(), torch.randn(2, 3, 8))


@pytest.mark.parametrize("conv,shape", [(lambda: nn.Conv2d(3, 4, 3, padding="same"), (3, 9, 8)),
                                        (lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 9, 8)),
                                        (lambda: nn.Conv2d(3, 4, (2, 5), padding="same", dilation=(1, 2)), (3, 9, 8)),
                                        (lambda: nn.Conv2d(3, 4, 3, padding="valid"), (3, 9, 8)),
                                        (lambda: nn.Conv1d(3, 4, 4, padding="same"), (3, 9))],
                         ids=["same_odd", "same_even", "same_dilated", "valid", "same_1d"])
def test_padding_by_name(conv, shape):
    """ConvMixer writes padding="same": symmetric amounts stay in the convolution, uneven ones (even kernels)
    become a zero padding before it, the extra after, as torch pads."""
    torch.manual_seed(0)
    m = nn.Sequential(conv(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).eval()
    m(torch.rand(2, *shape))
    g = capture(m, torch.rand(2, *shape))
    exact_at_batches(g, m, shape, (1, 3), 1e-5)


class RepeatInterleave(nn.Module):
    """GCViT: a sample's global query repeated for each of its windows (folded into the batch axis)."""

    def forward(self, x):                                   # x: (B, 4, 6)
        windows = x.reshape(-1, 2, 6)                       # (B·2, 2, 6)
        query = x.mean(1, keepdim=True).repeat_interleave(windows.shape[0] // x.shape[0], dim=0)
        return (windows * query).reshape(x.shape[0], -1) + x.repeat_interleave(2, dim=2).sum(2)[:, :1]


def test_repeat_interleave_along_the_batch_axis_and_another():
    m = RepeatInterleave()
    exact_at_batches(capture(m, torch.rand(2, 4, 6)), m, (4, 6), (1, 3))


def test_capturing_a_module_leaves_its_cached_state_alone():
    """EfficientFormer-V2 caches its attention bias in a plain dict attribute on the first eval-mode call: when
    that call is the export's, the cache kept a traced value and the caller's module gave symbolic outputs."""
    m = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=10, img_size=64).eval()
    twin = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=10, img_size=64).eval()
    twin.load_state_dict(m.state_dict())
    x = torch.rand(1, 3, 64, 64)
    g = capture(m, torch.rand(2, 3, 64, 64))         # the first call: the export's
    after = m(x)
    assert type(after.abs().max().item()) is float
    torch.testing.assert_close(after, twin(x))
    torch.testing.assert_close(run(g, x, spiking=False), twin(x), rtol=1e-5, atol=1e-5)


def test_multihead_attention_exported_with_a_dynamic_batch_captures():
    """nn.MultiheadAttention computes ``bsz * num_heads`` with Python arithmetic on the batch size: exported with a
    dynamic batch (as the docs ask), the graph holds operator.mul on sizes, which carries no data."""
    from test_samples import WindowsAndHeads
    m = WindowsAndHeads().eval()
    x = torch.randn(5, 1, 8, 8)
    ep = torch.export.export(m, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    g = capture(ep, x[:2])
    torch.testing.assert_close(run(g, x), m(x), rtol=1e-5, atol=1e-5)
