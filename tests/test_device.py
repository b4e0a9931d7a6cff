"""--device: refusals, the mirror that keeps a graph's parameters on the device in step with the passes, and
(when a GPU is present) levels and counts against the CPU on the same batch."""
import pytest
import torch
from click.testing import CliRunner

from sfn_deploy import devices
from sfn_deploy.cli import main
from sfn_deploy.evaluation import measure
from sfn_deploy.passes import set_scale
from sfn_deploy.simulators.firegrid import fire_with
from sfn_deploy.simulators.interpreter import Observer, run, run_on, run_with_levels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (CI has none)")


@pytest.fixture
def cpu_after():
    yield
    devices.select("cpu")


@pytest.mark.parametrize("spec, says", [
    ("tpu", "--device tpu: expected auto, cpu, cuda or cuda:N"),
    ("cuda:x", "--device cuda:x: expected auto, cpu, cuda or cuda:N"),
    ("cuda:99", "--device cuda:99: "),
])
def test_device_refused_with_one_line(spec, says, cpu_after, tmp_path):
    if spec == "cuda:99" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "none.sfn.pt"), "--data", "sklearn:digits",
                                  "--device", spec])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr


def test_cuda_refused_without_a_gpu(cpu_after, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "none.sfn.pt"), "--data", "sklearn:digits",
                                  "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA GPU is available here" in r.stderr and "--device cpu" in r.stderr
    assert devices.resolve("auto") == torch.device("cpu") and devices.resolve("CPU") == torch.device("cpu")


def test_mirror_follows_the_passes(digits_pt2, digits):
    """The mirror copies a node again exactly when a pass replaced one of its parameters (set_scale in the λ
    search): a stale copy would run the old λ. On the CPU ``.to`` keeps the tensor, so a stale node here runs the
    old boundaries; the meta device stands in for a GPU's copies (and the graph, a dataclass, is no dict key)."""
    from sfn_deploy.convert import convert
    from sfn_deploy.models import load_model
    net, ident = load_model(digits_pt2)
    graph = convert(net, digits.limit(300), scale=0.2, source=ident).graph
    cpu, meta = torch.device("cpu"), torch.device("meta")
    x = digits.x[:200]
    before = run(graph, x)
    assert devices.mirror(graph, cpu) is graph
    assert torch.equal(run_on(devices._mirrored(graph, cpu), x, True, None), before)
    site = graph.sites[0]
    weight_node = next(n for n in graph.nodes if n.op == "linear")
    held = devices.mirror(graph, meta)
    assert held[site.name].params["bounds_pos"].device == meta
    again = devices.mirror(graph, meta)
    assert again[site.name] is held[site.name]                       # unchanged: the same mirror node
    set_scale(graph, 0.05)
    moved = devices.mirror(graph, meta)
    assert moved[site.name] is not held[site.name]
    assert moved[weight_node.name] is held[weight_node.name]        # untouched nodes are not copied again
    after = run(graph, x)
    assert not torch.equal(after, before)                            # (λ does change the output)
    assert torch.equal(run_on(devices._mirrored(graph, cpu), x, True, None), after)


class _SiteInputs(Observer):
    def __init__(self):
        self.inputs: dict[str, torch.Tensor] = {}

    def __call__(self, event):
        if event.node.op == "sfn":
            self.inputs[event.node.name] = event.args[0].cpu()


@cuda
@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_vit"])
def test_gpu_levels_and_counts_match_the_cpu(name, mnist_dir, cpu_after):
    """The same batch on CPU and GPU. Given the same site inputs, the fire rule gives the same positions and
    histograms bit for bit. End to end the GPU's weight layers sum in another order, so a site input within an ulp
    of a boundary may fire differently: levels must agree in all but a few in 10^5 elements, and where they agree
    everywhere the op counts are identical."""
    from conftest import convert_example
    snn, data = convert_example(name, mnist_dir, test=64)
    graph, x = snn.graph, data.x
    devices.select("cpu")
    seen = _SiteInputs()
    run(graph, x, hook=seen)
    gpu = devices.select("cuda")
    twin = devices.mirror(graph, gpu)
    for site in twin.sites:
        ref = fire_with(graph[site.name], seen.inputs[site.name], hist=True)
        got = fire_with(site, seen.inputs[site.name].to(gpu), hist=True)
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b.cpu()), site.name
    devices.select("cpu")
    out_cpu, lv_cpu = run_with_levels(graph, x)
    preds_cpu, counts_cpu = measure(graph, data, batch_size=32)
    devices.select("cuda")
    out_gpu, lv_gpu = run_with_levels(graph, x)
    preds_gpu, counts_gpu = measure(graph, data, batch_size=32)
    differ = sum(int((lv_cpu[k] != lv_gpu[k]).sum()) for k in lv_cpu)
    total = sum(v.numel() for v in lv_cpu.values())
    assert differ <= 1e-4 * total, f"{differ} of {total} levels differ"
    assert float((preds_cpu == preds_gpu).float().mean()) >= 0.98
    if differ == 0:
        assert [c.to_dict() for c in counts_cpu.result().layers] == [c.to_dict() for c in counts_gpu.result().layers]


@cuda
def test_gpu_bias_correction_shifts_match_the_cpu(mnist_dir, cpu_after):
    """The shifts are means over a batch of differences: on the GPU they agree with the CPU's to float rounding."""
    from conftest import convert_example

    from sfn_deploy import bias_correction
    snn, data = convert_example("mnist_cnn", mnist_dir, test=64)
    devices.select("cpu")
    on_cpu = bias_correction.shifts(snn.graph, data.x)
    devices.select("cuda")
    on_gpu = bias_correction.shifts(snn.graph, data.x)
    assert on_cpu.keys() == on_gpu.keys()
    for k in on_cpu:
        assert on_gpu[k].device.type == "cpu" and torch.allclose(on_cpu[k], on_gpu[k], atol=1e-3), k
