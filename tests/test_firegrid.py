"""The constant-time fire function equals the bucketize rule bit for bit, boundaries included."""
import numpy as np
import pytest
import torch

from sfn_deploy.ir import Node
from sfn_deploy.neurons import fire_levels, level_values, spike_index, spike_levels
from sfn_deploy.passes import configure
from sfn_deploy.simulators.firegrid import fire, grid_for


def _site(fire_fn, m, rounding, theta_pos, theta_neg, lam, kind="dual"):
    attrs = {"kind": kind, "fire": fire_fn, "M": m, "levels": fire_levels(m, fire_fn), "rounding": rounding,
             "lam": lam, "theta_pos": theta_pos, "theta_neg": theta_neg, "o_max": theta_pos, "absorbs": None}
    return configure(Node("s", "sfn", ["x"], attrs, {}, [1, 8], 0), lam)


def _index(node, x):
    return fire(node, x)[1].long() - (node.params["table"].numel() - 1)


def _probes(node, rng):
    b = torch.cat([node.params["bounds_pos"], -node.params["bounds_neg"]]).numpy()
    edge = np.concatenate([b, np.nextafter(b, np.float32(np.inf)), np.nextafter(b, np.float32(-np.inf))])
    scale = float(np.abs(b).max()) if len(b) else 1.0
    rand = rng.standard_normal(20_000).astype(np.float32) * scale
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e38, -1e38, 1e-40, -1e-40], dtype=np.float32)
    return torch.from_numpy(np.concatenate([edge.astype(np.float32), rand, special]))


CASES = [(f, m, r, tp, tn, lam) for f in ("sformer", "linear", "exponential") for m in (1, 2, 4, 8, 16)
         for r in ("paper", "nearest") for tp, tn in ((1.0, 0.7), (3.3e-3, 0.0), (250.0, 1e-5))
         for lam in (0.05, 0.3, 1.0)]


@pytest.mark.parametrize("fire_fn, m, rounding, theta_pos, theta_neg, lam", CASES[::3])
def test_grid_equals_bucketize(fire_fn, m, rounding, theta_pos, theta_neg, lam):
    node = _site(fire_fn, m, rounding, theta_pos, theta_neg, lam)
    x = _probes(node, np.random.default_rng(m))
    out, pos = fire(node, x)
    assert torch.equal(pos.long() - (node.params["table"].numel() - 1), spike_index(node, x))
    ref = level_values(node, spike_levels(node, x))
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))       # bit-identical, ±0 included


def test_grid_is_used_for_the_usual_sites_and_rebuilt_after_configure():
    node = _site("sformer", 8, "paper", 1.0, 0.5, 0.2)
    g = grid_for(node)
    assert g is not None and g.ok and 32 - g.shift <= 16
    assert grid_for(node) is g                       # cached
    configure(node, 0.4)
    g2 = grid_for(node)
    assert g2 is not g
    x = _probes(node, np.random.default_rng(0))
    assert torch.equal(_index(node, x), spike_index(node, x))


def test_softmax_site_and_nan_do_not_crash():
    node = _site("sformer", 8, "paper", 0.9, 0.0, 0.3, kind="softmax")
    x = torch.tensor([float("nan"), 0.1, 0.9, 1.0], dtype=torch.float32)
    out, _ = fire(node, x)
    assert torch.equal(_index(node, x)[1:], spike_index(node, x)[1:]) and out.shape == x.shape


def test_exponential_sixteen_levels_agrees():
    node = _site("exponential", 16, "paper", 1.0, 1.0, 1.0)     # levels up to 2^31: a wide range
    x = _probes(node, np.random.default_rng(1))
    assert torch.equal(_index(node, x), spike_index(node, x))


@pytest.fixture(params=["simd", "scalar"])
def loop(request):
    """The compiled loop, once with its SIMD (AVX2) kernel where the CPU has one, once scalar."""
    from sfn_deploy.simulators import firegrid
    lib = firegrid.native()
    if lib is None:
        pytest.skip("no C compiler: the torch operations run")
    if request.param == "simd" and not lib.sfn_simd(1):
        pytest.skip("no AVX2 on this CPU: the scalar loop runs")
    before = lib.sfn_simd(-1)
    lib.sfn_simd(request.param == "simd")
    yield lib
    lib.sfn_simd(before)                     # what SFN_SIMD chose for the rest of the run


@pytest.mark.parametrize("fire_fn, m, rounding, theta_pos, theta_neg, lam", CASES[1::3])
def test_native_loop_equals_torch_ops(fire_fn, m, rounding, theta_pos, theta_neg, lam, monkeypatch, loop):
    """The fused C loop (SIMD and scalar) gives the torch path's output bits, positions and histogram, NaN
    included, for lengths that end inside a vector and a block."""
    from sfn_deploy.neurons import level_table as _level_table
    node = _site(fire_fn, m, rounding, theta_pos, theta_neg, lam)
    grid = grid_for(node)
    if grid is None:
        pytest.skip("bucketize site")
    x = _probes(node, np.random.default_rng(m))
    x = torch.cat([x, torch.tensor([float("nan"), -float("nan")])]).view(-1, 2)[:, 0]   # strided input
    values = _level_table(node, torch.float32)
    out, pos, hist = grid.fire(x, values, hist=True)
    _, none, hist2 = grid.fire(x, values, hist=True, position=False)
    monkeypatch.setenv("SFN_NATIVE", "0")
    ref_out, ref_pos, ref_hist = grid.fire(x, values, hist=True)
    assert torch.equal(out.view(torch.int32), ref_out.view(torch.int32)) and out.is_contiguous()
    assert torch.equal(pos, ref_pos) and pos.dtype == torch.int32
    assert torch.equal(hist, ref_hist) and torch.equal(hist2, ref_hist) and none is None
    assert int(hist.sum()) == x.numel()


def test_fire_is_the_same_with_and_without_the_native_loop(monkeypatch):
    node = _site("sformer", 8, "paper", 1.0, 0.5, 0.2)
    x = torch.randn(64, 33, 7)[:, ::2]                  # non-contiguous, above the native threshold
    out, pos = fire(node, x)
    monkeypatch.setenv("SFN_NATIVE", "0")
    ref_out, ref_pos = fire(node, x)
    assert torch.equal(out.view(torch.int32), ref_out.view(torch.int32)) and torch.equal(pos, ref_pos)
    assert out.shape == pos.shape == x.shape


def test_native_loop_split_over_threads_is_the_same(monkeypatch, loop):
    """Parts on several threads (each its own histogram) give the single-thread bits, positions and counts."""
    from sfn_deploy.neurons import level_table as _level_table
    from sfn_deploy.simulators import firegrid
    node = _site("sformer", 8, "paper", 1.0, 0.5, 0.2)
    grid, values = grid_for(node), _level_table(node, torch.float32)
    x = torch.randn(50_001) * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = grid.fire(x, values, hist=True)
        monkeypatch.setattr(firegrid, "_PART_MIN", 1000)
        torch.set_num_threads(3)
        assert firegrid._parts(x.numel()) == 3
        got = grid.fire(x, values, hist=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0].view(torch.int32), ref[0].view(torch.int32))
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]) and int(got[2].sum()) == x.numel()


def test_native_loop_many_bins_and_block_tails(loop):
    """More positions than the loop's small partial histograms hold (counted straight into int64) and lengths
    around the 8-element vectors and 256-element blocks: the torch path's results."""
    from sfn_deploy.neurons import level_table as _level_table
    node = _site("linear", 600, "paper", 1.0, 1.0, 0.01)                 # 2·600 + 1 positions
    grid, values = grid_for(node), _level_table(node, torch.float32)
    assert grid is not None and 2 * (values.numel() // 2) + 1 > 1024
    for n in (4096, 4103, 4352, 4357, 70_001):
        x = torch.randn(n) * 0.7
        got = grid.fire(x, values, hist=True)
        k = grid.position(x)                                               # the torch operations
        assert torch.equal(got[1], k)
        assert torch.equal(got[0].view(torch.int32), values[k.long()].view(torch.int32))
        assert torch.equal(got[2], torch.bincount(k.long(), minlength=values.numel()))


def test_build_without_the_simd_kernel(tmp_path, monkeypatch):
    """The fallback build for compilers that cannot build the AVX2 kernel: it compiles and never uses SIMD."""
    import shutil

    from sfn_deploy.simulators import firegrid
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SFN_CACHE", str(tmp_path))
    path = firegrid.cache_path(openmp=False, simd=False)
    lib = firegrid._load(path, ["-DSFN_SCALAR"])
    assert lib is not None and path.endswith("_scalar.so") and lib.sfn_simd(1) == 0
