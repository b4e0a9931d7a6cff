"""sfn-deploy: single-timestep Scale-and-Fire spiking networks from trained PyTorch models.

Python API (the CLI calls the same functions)::

    from sfn_deploy import convert, evaluate, load, save, load_data, load_model
    model, _ = load_model("examples/models/mnist_cnn.pt2")
    data = load_data("mnist:../shared/data/mnist:0:8000")
    snn = convert(model, data, scale=0.2)
    print(evaluate(snn, load_data("mnist:../shared/data/mnist:8000:10000")))
"""
from .convert import convert
from .data import load_data
from .evaluation import evaluate
from .model_file import ConvertedModel, load, save
from .models import load_model
from .version import __version__

__all__ = ["convert", "evaluate", "load", "save", "load_data", "load_model", "ConvertedModel", "__version__"]
