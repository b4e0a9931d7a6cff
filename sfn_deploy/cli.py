"""The ``sfn-deploy`` command line (SPEC §6).

Exit codes: 0 success; 2 bad usage or bad input (one line on stderr naming the
file, layer or field); 1 internal error (traceback with --debug).
With ``--json`` a command prints exactly one JSON object on stdout and nothing else.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from typing import TYPE_CHECKING

import click

from .backends import export_targets, help_text
from .backends import names as backend_names
from .errors import UserError
from .methods import METHODS

if TYPE_CHECKING:
    from .tuning import ParetoPoint


def _emit(as_json: bool, payload: dict, text: str) -> None:
    if not _writer():
        return
    if as_json:
        click.echo(json.dumps(payload, default=_jsonable, ensure_ascii=False))
    else:
        click.echo(text)


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _error_line(e: BaseException) -> str:
    """One line for the user: the message's first line, without library advice that does not apply."""
    from .untrusted import reason
    text = str(e).strip()
    first = text.splitlines()[0].strip() if text else type(e).__name__
    return reason(e) if "weights_only" in text or "warnings above" in first else first


def _fail(as_json: bool, message: str, code: int, **extra) -> None:
    """The exit-code contract: one line on stderr; with --json also one JSON object on stdout."""
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code, **extra}, ensure_ascii=False))
    click.echo(("" if code == 130 else "error: " if code == 2 else "internal error: ") + message, err=True)
    sys.exit(code)


SPLIT_COMMANDS = ("convert_cmd", "evaluate_cmd", "report_cmd")     # what runs data-parallel under torchrun


def _under_torchrun() -> bool:
    """Whether torchrun started this process as one of several (read from its environment: joins nothing)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _writer() -> bool:
    """Rank 0 under torchrun (or the only process) prints and writes; the other ranks only compute."""
    if not _under_torchrun():
        return True
    from .distributed import is_writer
    return is_writer()


def _torchrun_check(name: str) -> None:
    if _under_torchrun() and name not in SPLIT_COMMANDS:
        raise UserError(f"{name[:-4]} runs in one process; under torchrun only convert, evaluate and report "
                        "split their data between ranks")


def command(fn):
    """Shared --json/--debug handling and the exit-code contract."""
    @click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
    @click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
    @functools.wraps(fn)
    def wrapper(*args, as_json=False, debug=False, **kwargs):
        if not debug:
            warnings.filterwarnings("ignore")
            logging.getLogger("torch").setLevel(logging.ERROR)
            # SQLAlchemy (Optuna's --storage) logs a traceback when Ctrl-C lands inside its connection pool's
            # finaliser; the command still ends with "interrupted", and storage errors surface as exceptions.
            logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
            if "optuna" in sys.modules or fn.__name__ in ("convert_cmd", "tune_cmd"):
                import optuna  # importing optuna resets its logger: set its own verbosity
                optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            _torchrun_check(fn.__name__)
            if "device" in kwargs:                 # the commands that compute (device_option)
                from .devices import select
                select(kwargs.pop("device"))
            return fn(*args, as_json=as_json, **kwargs)
        except UserError as e:
            if debug:
                traceback.print_exc()
            _fail(as_json, _error_line(e), 2)
        except KeyboardInterrupt:
            _fail(as_json, "interrupted", 130)
        except click.exceptions.Exit:
            raise
        except OSError as e:    # the file system refused: a read-only folder, a full disk, a vanished file
            if debug:
                traceback.print_exc()
            where = f"{e.filename}: " if e.filename else ""
            _fail(as_json, f"{where}{e.strerror or _error_line(e)}", 2)
        except Exception as e:  # an internal error: say so, keep the traceback behind --debug
            if debug:
                traceback.print_exc()
            if _during_interrupt(e):
                _fail(as_json, "interrupted", 130)
            _fail(as_json, f"{type(e).__name__}: {_error_line(e)} (rerun with --debug for the traceback)", 1)
    return wrapper


def device_option(fn):
    """--device for the commands that run the interpreter (sfn_deploy/devices.py); read by :func:`command`."""
    return click.option("--device", default="auto",
                        help="Where the network runs: auto (a GPU if there is one), cpu, cuda or cuda:N "
                             "(docs/cli.md, 'Where it runs').")(fn)


def _during_interrupt(e: BaseException | None) -> bool:
    """An error raised while a library unwound from Ctrl-C (Optuna's trial bookkeeping can fail that way)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__ or e.__cause__
    return False


class _FiniteRange(click.FloatRange):
    """A float range that also refuses nan (which compares false with both bounds)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{v} is not a finite number", param, ctx)
        return v


def _threads_left(grace: float = 1.0) -> list:
    """The non-daemon threads still there after ``grace`` seconds (Python waits for them before it exits); polled,
    not joined: a thread whose ``start()`` the interrupt cut short cannot be joined."""
    import threading
    deadline = time.monotonic() + grace
    while True:
        left = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _interrupt_again(hook):
    """An unraisable-exception hook that delivers again a Ctrl-C that landed inside a finaliser (``__del__``, a
    weakref callback: a library's connection pool, a tensor's storage), where Python would print "Exception ignored
    in ..." and swallow it, and the command would go on running. Sent again a moment later from a helper thread:
    raised here, inside the hook, it would be swallowed the same way."""
    import signal
    import threading

    def unraisable(u):
        if u.exc_type is not None and issubclass(u.exc_type, KeyboardInterrupt):
            main_id = threading.main_thread().ident
            again = threading.Timer(0.05, signal.pthread_kill, (main_id, signal.SIGINT))
            again.daemon = True
            again.start()
            return
        hook(u)
    return unraisable


class _Group(click.Group):
    """Click's usage errors as one line (and one JSON object with --json), like every other error."""

    def __call__(self, *args, **kwargs):
        """The process's entry point (the console script, ``python -m``): an interrupted process ends even when
        the interrupt left a library's non-daemon thread running, which Python would wait for forever (Optuna's
        heartbeat thread never stops when Ctrl-C lands just as it starts). Our own clean-up has run by then.
        In-process callers (click's CliRunner) call :meth:`main` and keep their interpreter."""
        sys.unraisablehook = _interrupt_again(sys.unraisablehook)
        try:
            return self.main(*args, **kwargs)
        except SystemExit as e:
            if e.code == 130 and _threads_left():
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:   # a bare command: its help, as --help would
            click.echo(e.ctx.get_help())
            rv = 0
        except click.exceptions.UsageError as e:
            where = e.ctx.command_path + ": " if e.ctx is not None else ""
            message = where + " ".join(e.format_message().split()) + " (see --help)"
            _fail("--json" in argv, message, 2)
        except click.exceptions.ClickException as e:
            _fail("--json" in argv, " ".join(e.format_message().split()), 2)
        except click.exceptions.Abort:
            _fail("--json" in argv, "interrupted", 130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="sfn-deploy")
def main():
    """Convert trained PyTorch networks into single-timestep Scale-and-Fire spiking networks."""
    from .allocator import tune
    tune()                      # flat peak memory over long streamed runs (sfn_deploy/allocator.py)


def model_options(fn):
    fn = click.option("--trust-pickle", is_flag=True, help="Allow a pickled nn.Module (runs code from the file).")(fn)
    fn = click.option("--model-args", default=None,
                      help="timm:/torchvision: keyword arguments, e.g. num_classes=10,img_size=28.")(fn)
    fn = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                      help="Weights for a timm: or torchvision: model (safetensors or a state dict).")(fn)
    return fn


def convert_options(fn):
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML file with any of these options; flags override it."),
        click.option("--levels", type=int, default=None, help="M: linear levels per polarity (default 8)."),
        click.option("--levels-if-missed", type=int, default=None,
                     help="When the result misses --max-drop (without it: 0.5 points) on the validation images, "
                          "bias correction included, search again with this M (default 12 unless --levels is "
                          "given; 0: off; docs/concepts.md, 'The λ search')."),
        click.option("--fine-if-missed/--no-fine-if-missed", default=None,
                     help="When the result still misses after --levels-if-missed, search once more with 32 "
                          "linear levels (M 16, --fire linear), at more energy (default on "
                          "unless --levels or --fire is given)."),
        click.option("--fire", type=click.Choice(["sformer", "linear", "exponential"]), default=None,
                     help="Fire function (default sformer)."),
        click.option("--rounding", type=click.Choice(["paper", "nearest"]), default=None,
                     help="Firing boundaries: the paper's y−1/2, or nearest level (default paper)."),
        click.option("--softmax-levels", type=click.Choice(["dense", "fire"]), default=None,
                     help="Post-softmax neurons: every integer level up to the fire function's top level, or the "
                          "fire function's own levels (the paper's; default dense; docs/concepts.md, 'The neuron')."),
        click.option("--input-encoding", type=click.Choice(["auto", "analog", "spikes"]), default=None,
                     help="The network input: analog (the first weight layers compute MACs), or spikes from an "
                          "input neuron on x − min (their work becomes ACs); auto: spikes where those layers hold "
                          "10%% or more of the ANN's MACs and the offset folds exactly into their biases (default "
                          "auto; docs/concepts.md, 'Input encoding')."),
        click.option("--percentile", type=float, default=None, help="p: θ is the top-p%% activation (default 1)."),
        click.option("--search", type=click.Choice(["shared", "per-block", "per-site"]), default=None,
                     help="λ search space (default shared)."),
        click.option("--strategy", type=click.Choice(["tpe", "staged"]), default=None,
                     help="How the search spends its trials: tpe = the paper's TPE study; staged = shared grid, "
                          "refinement, then per group, poor points scored on few images, the choice checked at "
                          "λ ± 3 %% (default: tpe for --search shared, staged otherwise)."),
        click.option("--trials", type=int, default=None, help="Search trials (default 50)."),
        click.option("--val-size", type=int, default=None,
                     help="Validation images (search and reported drop): all of them when there are at most N, "
                          "else a seeded random N (default 2000)."),
        click.option("--val-fraction", type=float, default=None,
                     help="Instead of --val-size: a random share of --data (the paper's 0.02); giving both is "
                          "refused."),
        click.option("--val-data", default=None,
                     help="Validation images apart from --data (same forms as --data); calibration then uses all "
                          "of --data. Capped by --val-size."),
        click.option("--check-size", type=int, default=None,
                     help="Images the search did not choose on (after the validation images, else calibration "
                          "images) that check the chosen point: its drop there is reported, and a miss there also "
                          "runs --levels-if-missed and --fine-if-missed (default 2000; 0: off; docs/concepts.md, "
                          "'Validation images and the drop')."),
        click.option("--storage", default=None,
                     help="Optuna storage: a database URL, a SQLite file path, or a PATH.journal file on a shared "
                          "file system (docs/cli.md, 'Many workers, many machines')."),
        click.option("--study", default=None, help="Optuna study name (default: from model and options)."),
        click.option("--seed", type=int, default=None, help="Random seed (default 0)."),
        click.option("--batch-size", type=int, default=None, help="Batch size (default 256)."),
        click.option("--calib-limit", type=int, default=None, help="Use at most N samples to calibrate."),
        click.option("--bias-correction", type=click.Choice(["auto", "on", "off", "search"]), default=None,
                     help="Fold each weight layer's mean SNN−ANN shift (256 calibration images) into the SNN's bias; "
                          "search scores every λ trial with its own correction and keeps the chosen point's; auto "
                          "is search with --max-drop, else keeps the correction only if agreement with the ANN on "
                          "the validation images does not fall and the drop stays within 0.5 or does not grow "
                          "(default auto; docs/concepts.md, 'Bias correction')."),
        click.option("--fidelity", type=click.Choice(["auto", "accuracy", "output"]), default=None,
                     help="What the search and the reported drop compare with the ANN: accuracy = top-1 (the "
                          "labels, or the ANN's top-1 on unlabeled data); output = cosine similarity of the "
                          "outputs (backbones, feature maps; --max-drop then counts points of 100·cosine). "
                          "Default auto: output when the model does not return one N×classes tensor, is a timm "
                          "model with num_classes=0, or (unlabeled data) no linear/conv layer produces its output "
                          "(docs/concepts.md, 'Fidelity')."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _config(config_file, kwargs):
    """The conversion options: ConvertConfig's fields given as flags, over the TOML file's."""
    from dataclasses import fields

    from .config import ConvertConfig, load_config
    overrides = {f.name: kwargs[f.name] for f in fields(ConvertConfig) if kwargs.get(f.name) is not None}
    return load_config(config_file, overrides)


def _load_model(model, weights, model_args, trust_pickle):
    from .models import load_model, parse_model_args
    return load_model(model, weights, parse_model_args(model_args), trust_pickle)


def _check_convert_paths(model, data, output, config_file, weights, storage, val_data=None) -> None:
    """convert/tune: no output (the model file, the study database) may be one of the command's inputs."""
    from .config import storage_path
    from .data import check_not_read, data_paths
    from .models import library_spec
    from .outputs import check_output
    inputs = [None if library_spec(model) else model, weights, config_file, *data_paths(data),
              *data_paths(val_data)]
    db = storage_path(storage)
    if db is not None:
        check_output(db, inputs + [output], "--storage")
    if output is not None:
        check_output(output, inputs + [db])
    for spec in (data, val_data):
        check_not_read(db, spec, "--storage")
        check_not_read(output, spec)


def data_options(fn):
    """How images become inputs (docs/data.md): recorded by convert/tune, reused and checked by the others."""
    opts = [
        click.option("--resize", default=None, metavar="N|H,W|none",
                     help="Images: scale the shorter side to N pixels (H,W: to exactly H×W)."),
        click.option("--crop", default=None, metavar="N|H,W|none", help="Images: the centre N×N (or H×W)."),
        click.option("--mean", default=None, metavar="M[,M,M]|none",
                     help="Images: subtract per channel after scaling pixels to [0, 1]."),
        click.option("--std", default=None, metavar="S[,S,S]|none", help="Images: then divide per channel."),
        click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest", "lanczos", "box",
                                                           "hamming"]), default=None,
                     help="Images: resampling filter of --resize (default bilinear; timm: the model's)."),
        click.option("--channels", type=click.Choice(["1", "3"]), default=None,
                     help="Images: greyscale or RGB (default: the model's, else the first image's)."),
        click.option("--workers", type=click.IntRange(0, 64), default=None,
                     help="Worker processes decoding images (default 2; 0: in this process)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


_DATA_OPTS = ("resize", "crop", "mean", "std", "interpolation", "channels", "workers")


def _data_options(kw, config_file=None) -> tuple[dict, int]:
    """(parsed preprocessing options, workers) from the flags over the config file's keys; pops the flags."""
    from .config import read_data_options
    from .data import DEFAULT_WORKERS
    from .preprocess import parse_options
    flags = {k: v for k in _DATA_OPTS if (v := kw.pop(k, None)) is not None}
    raw = read_data_options(config_file)
    workers = flags.pop("workers", raw.pop("workers", DEFAULT_WORKERS))
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 64:
        raise UserError(f"{config_file}: option 'workers': expected a whole number 0..64, got {workers!r}")
    options = parse_options(raw, f"{config_file}: option ") if raw else {}
    options.update(parse_options(flags))
    return options, workers


def _load_datasets(data, val_data, model="", net=None, options=None, workers=0):
    """--data, with --val-data's images kept apart for validation when given. Images get the model's own
    preprocessing (timm's data config) overridden by the options; --val-data the same as --data."""
    from .data import is_image_spec, load_data
    from .preprocess import timm_defaults
    options = options or {}
    defaults = None
    if model.startswith("timm:") and net is not None and (is_image_spec(data) or is_image_spec(val_data)):
        defaults = timm_defaults(net, model[len("timm:"):], options)
    if model.startswith("torchvision:") and is_image_spec(data) and not {"mean", "std"} & set(options):
        _warn(f"{model} carries no preprocessing: images are read as [0, 1] pixels without mean/std; torchvision's "
              "ImageNet weights expect --resize 256 --crop 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    ds = load_data(data, options, defaults=defaults, workers=workers)
    if val_data is None:
        return ds
    val = load_data(val_data, options, defaults=defaults, recorded=ds.preprocessing, recorded_in=f"--data {data}",
                    classes=ds.classes, input_shape=ds.sample_shape, workers=workers)
    return ds.with_validation(val)


def _model_data(model, path, data, options=None, workers=0, limit=None):
    """Data for a converted model: images get the preprocessing recorded in it (options checked against it),
    class names map onto its classes, and the first image is checked against its input shape."""
    from .data import is_image_spec, load_data
    if is_image_spec(data) and model.preprocessing is None and not options:
        _warn(f"{path} records no preprocessing: images are read as [0, 1] pixels at their own size, without "
              "mean/std (give --resize/--crop/--mean/--std as at conversion)")
    return load_data(data, options, recorded=model.preprocessing, recorded_in=path, classes=model.classes,
                     input_shape=list(model.input_shape), workers=workers, limit=limit)


def _pct(v: float | None) -> str:
    return "n/a (unlabeled)" if v is None else f"{v:.2f}%"


def _warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def _describe_images(pre) -> str:
    """The preprocessing line of convert's output: what the images became, and from where the values came."""
    if pre is None:
        return "inputs: tensors as given (no preprocessing recorded)"
    return f"inputs: {pre.describe()} [{pre.origin}]"


def _describe_validation(v) -> str:
    """``2,000 random of 8,000 images of --data``: how a Validation record chose its images."""
    where = "--val-data" if v.source == "val-data" else "--data"
    if v.rule == "all":
        return f"all {v.samples:,} images of {where}"
    how = " by --val-fraction" if v.rule == "fraction" else ""
    return f"a random {v.samples:,} of {v.available:,} images of {where}{how}"


def _describe_bias_correction(bc: dict) -> str:
    what = f"bias correction ({bc['mode']}, {bc['images']} calibration images): "
    what += f"{bc['layers']} layers corrected" if bc["applied"] else "not kept"
    if "val_agreement_after" in bc and bc.get("measure") == "cosine":
        what += (f"; validation cosine similarity {bc['val_agreement_before'] / 100:.4f} without it, "
                 f"{bc['val_agreement_after'] / 100:.4f} with it")
    elif "val_agreement_after" in bc:
        what += (f"; validation agreement {bc['val_agreement_before']:.2f}% without it, "
                 f"{bc['val_agreement_after']:.2f}% with it")
    return what


def _describe_fidelity(r) -> str:
    """The SNN against its ANN: accuracies and top-1 agreement, or the outputs' cosine similarity."""
    if r.fidelity == "output":
        parts = f" (per output: {', '.join(f'{v:.4f}' for v in r.cosine_parts)})" if r.cosine_parts else ""
        return (f"cosine similarity {r.cosine:.4f}{parts}  relative error {r.relative_error:.2f}% "
                "(SNN outputs against the ANN's)")
    if r.accuracy is None:
        return f"agreement {r.agreement:.2f}% (unlabeled: scored against the ANN's top-1)"
    return f"ANN {r.ann_accuracy:.2f}%  SNN {r.accuracy:.2f}%  agreement {r.agreement:.2f}%"


def _loose_budget(r, max_drop: float | None, kind: str, goal: bool = False) -> str | None:
    """After the fact, from the drop's measured interval: cosine budgets have no image-count rule (budget_warning
    counts discordant images), so say when the validation images measured the drop less precisely than half the
    budget; for accuracy, that rule's floor assumes no disagreement, so say when the interval's half-width exceeds
    the budget itself (the test drop may then pass it by that much: held-out CIFAR models, docs/benchmarks.md)
    and about how many images would bring it to the budget (the half-width falls as 1/√n). ``goal``: there was
    no ``--max-drop`` and ``max_drop`` is the goal the default's search keeps to (``config.GOAL``): the same
    rule, said of it."""
    from .evaluation import budget_warning
    if max_drop is None or r.drop is None:
        return None
    half = (r.drop.high - r.drop.low) / 2
    budget = (f"the default's goal of {max_drop:g} (no --max-drop)" if goal else f"--max-drop {max_drop:g}")
    if kind == "output":
        if half <= max_drop / 2:
            return None
        return (f"the validation images measure the drop to ±{half:.2g} points of 100·cosine, more than half of "
                f"{budget}: give more images (--val-size, --val-data) for a budget this tight")
    if max_drop <= 0 or half <= max_drop or (not goal and budget_warning(r.samples, max_drop)):  # (said before)
        return None
    need = math.ceil(r.samples * (half / max_drop) ** 2)
    return (f"the {r.samples:,} validation images measure the drop to ±{half:.2g} points, more than {budget}: "
            f"the drop on other images may pass {'it' if goal else 'the budget'} by that much; about {need:,} "
            f"would measure it to ±{max_drop:g} (--val-size, --val-data)")


def _chance_warning(r, classes: int) -> str | None:
    """A classifier whose ANN is at chance on its own validation labels is probably not a classifier of them
    (a backbone without a head, other labels, other preprocessing): say so once."""
    if r.ann_accuracy is None or classes < 2 or r.ann_accuracy > 150.0 / classes:
        return None
    return (f"the ANN gets {r.ann_accuracy:.2f}% of the validation labels right (chance: {100.0 / classes:.2g}%): "
            "if the model is not a classifier of these labels, convert with --fidelity output")


def _fmt_front(front: list[ParetoPoint]) -> str:
    lines = ["  trial  accuracy  energy ratio  λ"]
    for r in front:
        lams = sorted(set(round(v, 3) for v in r.lam.values()))
        lam = str(lams[0]) if len(lams) == 1 else f"{min(lams)}..{max(lams)} ({len(r.lam)} sites)"
        lines.append(f"  {r.trial:5d}  {r.accuracy:7.2f}%  {r.energy_ratio:12.4f}  {lam}")
    return "\n".join(lines)


@main.command("convert")
@click.argument("model")
@click.option("--data", required=True,
              help="Calibration data (and, without --val-data, the validation images): .npz, image folder, "
                   "sklearn:digits, mnist:DIR.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Converted model file.")
@click.option("--scale", type=float, default=None, help="Fix λ instead of searching it.")
@click.option("--tune/--no-tune", default=None, help="Search λ (the default unless --scale is given).")
@click.option("--max-drop", type=float, default=None,
              help="Budget in points of accuracy (of 100·cosine with --fidelity output): the lowest-energy "
                   "configuration within it.")
@click.option("--method", type=click.Choice(list(METHODS)), default=None,
              help="Conversion method (default sfn): sfn = Scale-and-Fire, T = 1; if = rate-coded IF over T steps; "
                   "mtn = its one-step multi-threshold equivalent (N = T); ecmt = ECMT over T steps; pmsm = "
                   "PMSM-R (signed multi-spike QAT, T = 1); mbe = MBE neurons for GELU/softmax/LayerNorm (T internal "
                   "steps per neuron, default 16). See docs/methods.md.")
@click.option("--timesteps", "-T", type=int, default=None,
              help="T for --method if, mtn, ecmt (defaults 64, 64, 4); mbe: internal steps per MBE neuron "
                   "(default 16); sfn runs one step.")
@click.option("--v0", type=float, default=None,
              help="if/mtn: initial membrane potential in units of θ (0 classic, 0.5 QCFS-style; default 0).")
@click.option("--epochs", type=float, default=None, help="pmsm: fine-tune epochs over --data (default 1).")
@convert_options
@data_options
@model_options
@device_option
@command
def convert_cmd(model, data, output, config_file, weights, model_args, trust_pickle, as_json, **kw):
    """Convert MODEL (.pt2, timm:NAME, torchvision:NAME or a trusted pickle) into a single-timestep SFN network
    (or, with --method, into one of the baselines it is compared with)."""
    from .convert import convert
    from .evaluation import format_drop
    from .model_file import save

    cfg = _config(config_file, kw)
    if cfg.storage and _under_torchrun():
        raise UserError("--storage under torchrun: the ranks would be workers of one study and could choose "
                        "different points; spread a search over processes with tune --storage instead")
    options, workers = _data_options(kw, config_file)
    _check_convert_paths(model, data, output, config_file, weights, cfg.storage, kw.get("val_data"))
    net, identity = _load_model(model, weights, model_args, trust_pickle)
    ds = _load_datasets(data, kw.get("val_data"), model, net, options, workers)
    val, record = ds.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)
    converted = convert(net, ds, cfg, source=identity, quiet=as_json, warn=_warn, validate=True)
    result = converted.validation
    classes = len(set(val.y.tolist())) if val.labeled else 0
    chance = _chance_warning(result, classes) if cfg.fidelity == "accuracy" else None
    if chance:
        _warn(chance)
    goal = cfg.max_drop is None and bool(converted.search) and cfg.method == "sfn"   # the default's search
    loose = _loose_budget(result, cfg.goal if goal else cfg.max_drop, cfg.fidelity, goal)
    if loose:
        _warn(loose)
    short = _short_of_goal(result, cfg.goal, converted.config.get("levels"), converted.search) if goal else None
    if short:
        _warn(short)
    over = _check_over_budget(converted.search, cfg.max_drop)
    if over:
        _warn(over)
    if _writer():
        save(converted, output)
    lams = sorted({round(s.attrs["lam"], 4) for s in converted.sites if s.attrs["kind"] != "softmax"})
    payload = {"output": output, "sites": len(converted.sites), "lam": lams[0] if len(lams) == 1 else lams,
               **{k: v for k, v in result.to_dict().items() if k not in ("layers", "drop")},
               "chosen": converted.search.get("chosen"), "config": cfg.to_dict(),
               "levels": converted.config.get("levels"), "fire": converted.config.get("fire"),
               "missed": converted.search.get("missed"), "tries": converted.search.get("tries"),
               "check": converted.search.get("check")}
    from .methods import method_of
    method, steps = method_of(converted.graph)
    payload.update({"method": method, "timesteps": steps, "convert_seconds": converted.metrics["convert_seconds"]})
    payload.update({"drop": result.drop.to_dict() if result.drop else None, "validation": record.to_dict()})
    pre = converted.preprocessing
    payload["preprocessing"] = None if pre is None else pre.to_dict()
    if method == "mbe":
        payload["mbe_placed"] = converted.metrics["mbe"]["placed"]
    what = f"{len(converted.sites)} SFN sites, λ = {payload['lam']}" if method == "sfn" else \
        f"method {method}, T = {steps}{' (one step, N = T levels)' if method == 'mtn' else ''}, " \
        f"{len(converted.sites)} neuron sites"
    if method == "mbe":
        what = f"method mbe, T = {steps} internal steps per MBE neuron, " + ", ".join(
            f"{v} {k}" for k, v in payload["mbe_placed"].items())
    text = (f"converted {model} -> {output}: {what}\n"
            f"{_describe_images(pre)}\n"
            f"validation ({_describe_validation(record)}): {_describe_fidelity(result)}  "
            f"energy ratio {result.energy_ratio:.4f}"
            f"{'; ' + format_drop(result.drop) if result.drop else ''}")
    if converted.search.get("check"):
        text += "\n" + _describe_check(converted.search)
    bc = converted.metrics.get("bias_correction")
    payload["bias_correction"] = bc
    if bc:
        text += "\n" + _describe_bias_correction(bc)
    if converted.search:
        text += "\n" + _describe_search(converted.search)
    _emit(as_json, payload, text)


def _tries(search: dict, levels: int | None) -> list[dict]:
    """The searches convert ran, in order ({levels, fire, accuracy, kept}): the ladder's record, or from files
    converted before it the one retry in ``missed``."""
    if "tries" in search:
        return search["tries"]
    missed = search.get("missed")
    if missed is None:
        return [{"levels": levels, "kept": True}]
    kept = {"levels": search.get("levels", levels), "kept": True}
    first_kept = kept["levels"] < missed["levels"]
    return [kept, {**missed, "kept": False}] if first_kept else [{**missed, "kept": False}, kept]


def _at(t: dict) -> str:
    return f"M = {t['levels']}" + (f" {t['fire']}" if t.get("fire") and t["fire"] != "sformer" else "")


def _check_drop(search: dict):
    """The recorded drop on the images the search did not choose on (a PairedDrop), or None."""
    from .evaluation import PairedDrop
    drop = (search.get("check") or {}).get("drop")
    return None if drop is None else PairedDrop(**drop)


def _describe_check(search: dict) -> str:
    """``check (2,000 of 8,000 images of --data the search did not choose on): drop …``."""
    from .evaluation import format_drop
    check = search["check"]
    where = "--val-data" if check["source"] == "val-data" else "--data"
    return (f"check ({check['samples']:,} of {check['available']:,} images of {where} the search did not choose "
            f"on): {format_drop(_check_drop(search))}")


def _check_over_budget(search: dict, max_drop: float | None) -> str | None:
    """With --max-drop, a check drop past the budget: said, since nothing is searched again for it."""
    check = _check_drop(search)
    if max_drop is None or check is None or check.points <= max_drop:
        return None
    from .evaluation import format_drop
    return (f"on the images the search did not choose on, the {format_drop(check)} is more than "
            f"--max-drop {max_drop:g}: the budget may not hold on other images (more validation images, or "
            "--val-data with unseen ones, choose more reliably; docs/concepts.md \"Validation images and the drop\")")


def _short_of_goal(r, goal: float, levels: int | None, search: dict) -> str | None:
    """The default's result still more than its goal below the ANN on the validation images or the check's,
    after the search at every M it tried: said in one line, since nothing else in the output calls it a miss."""
    from .evaluation import format_drop
    check = _check_drop(search)
    where = [f"{format_drop(r.drop)} on the validation images"] if r.drop is not None and r.drop.points > goal \
        else []
    if check is not None and check.points > goal:
        where.append(f"{format_drop(check)} on the images the search did not choose on")
    if not where:
        return None
    tried = " or ".join(_at(t) for t in _tries(search, levels) if t.get("levels"))
    return (f"the converted network's {' and '.join(where)} {'is' if len(where) == 1 else 'are'} more than the "
            f"default's goal of {goal:g} points: no λ at {tried} reached it (docs/benchmarks.md "
            "\"What the test split can tell\")")


def _describe_search(search: dict) -> str:
    line = f"λ search: {search['trials_completed']} trials, chose trial {search['chosen']['trial']} " \
           f"({search['chosen']['rule']})"
    missed = search.get("missed")
    if missed is None:
        return line
    goal = missed.get("goal")             # files converted before the goal was recorded: a --max-drop budget
    within = "within the budget" if goal is None else f"within {goal:g} points of the ANN"
    tries = _tries(search, search.get("levels"))
    kept = next(i for i, t in enumerate(tries) if t["kept"])

    def reading(t: dict) -> str:                # validation, bias correction included; then the check's drop
        accuracy = t.get("accuracy", (t.get("chosen") or {}).get("accuracy", float("nan")))
        check = f", check drop {t['check_drop']:.2f}" if "check_drop" in t else ""
        return f"validation {accuracy:.2f}%{check}"
    before = [f"{'searched again at' if i else 'λ search at'} {_at(t)}: not {within} ({reading(t)})"
              for i, t in enumerate(tries[:kept])]
    after = [f"a later search at {_at(t)} was not {within} either ({reading(t)})" for t in tries[kept + 1:]]
    text = "; ".join(before) + f"; searched again at {_at(tries[kept])}:\n{line}" if before else line
    if after:
        text += "; " + "; ".join(after) + f", {_at(tries[kept])} kept"
    return text


@main.command("tune")
@click.argument("model")
@click.option("--data", required=True, help="Calibration/validation data.")
@click.option("--max-drop", type=float, default=None, help="Also pick the cheapest point within D points.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the converted model at the chosen point.")
@convert_options
@data_options
@model_options
@device_option
@command
def tune_cmd(model, data, output, config_file, weights, model_args, trust_pickle, as_json, **kw):
    """Search λ for accuracy and energy together; resumable with --storage/--study."""
    from .convert import Conversion, finish, run_passes
    from .evaluation import budget_warning
    from .methods import Applied
    from .model_file import save
    from .passes import set_scale
    from .tuning import choose, run_search

    if kw.get("storage") is None:
        kw["storage"] = "sfn-tune.db"
    cfg = _config(config_file, {**kw, "tune": True})
    options, workers = _data_options(kw, config_file)
    _check_convert_paths(model, data, output, config_file, weights, cfg.storage, kw.get("val_data"))
    net, identity = _load_model(model, weights, model_args, trust_pickle)
    ds = _load_datasets(data, kw.get("val_data"), model, net, options, workers)
    val, record = ds.validation_split(cfg.val_size, cfg.val_fraction, cfg.seed)
    t0 = time.time()
    c = run_passes(Conversion(net, ds, cfg, identity, quiet=as_json), stop_before="scale")
    graph = c.captured()
    warning = budget_warning(len(val), cfg.max_drop, record.available)
    if warning:
        _warn(warning)
    result = run_search(graph, ds, cfg, identity, quiet=as_json)
    chosen = choose(result, cfg.max_drop)
    result.chosen = chosen
    search = result.to_dict()
    if output:      # what convert would write at this point: bias correction, the second search at more levels
        set_scale(graph, chosen.lam)
        c.applied = Applied(search=search)
        converted = finish(run_passes(c, start="bias_correction"), t0)
        search = converted.search
        if _writer():
            save(converted, output)
    scored = (f"ANN validation accuracy {result.ann_accuracy:.2f}%" if cfg.fidelity == "accuracy" and val.labeled
              else "trials scored by agreement with the ANN's top-1 (unlabeled)" if cfg.fidelity == "accuracy"
              else "trials scored by 100 × cosine similarity with the ANN's outputs")
    text = (f"study {result.study} in {result.storage}: {result.trials_completed} completed trials, "
            f"{scored} on {_describe_validation(record)}\n"
            f"Pareto front (accuracy ↑, energy ratio ↓):\n{_fmt_front(result.pareto_front)}\n"
            f"chosen: trial {chosen.trial} ({chosen.rule})")
    if "missed" in search:
        text += "\n" + _describe_search(search)
    if search.get("check"):
        text += "\n" + _describe_check(search)
    _emit(as_json, {**search, "output": output}, text)


def _bundle_data(path, precision, data, options, workers, limit):
    """Data for a Lava bundle run alone: images get the preprocessing recorded in its manifest."""
    from .data import load_data
    from .exporters.lava import read_bundle
    from .preprocess import Preprocess
    manifest, plans = read_bundle(path, precision)
    recorded = manifest.get("preprocessing")
    try:
        pre = None if recorded is None else Preprocess.from_dict(recorded)
    except ValueError as e:
        raise UserError(f"{path}: invalid Lava bundle: 'preprocessing' {e}") from None
    classes = manifest.get("classes")
    return load_data(data, options, recorded=pre, recorded_in=path, input_shape=plans[precision].input_shape,
                     classes=classes if isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                     else None, workers=workers, limit=limit)


def _lava_options(f):
    f = click.option("--precision", type=click.Choice(["floating_pt", "fixed_pt"]), default=None,
                     help="Lava: floating point, or Loihi's fixed point (8-bit weights, 24-bit membranes) "
                          "[default: floating_pt].")(f)
    f = _avg_pool_option(None)(f)
    return click.option("--lowering", type=click.Choice(["graded", "channels"]), default=None,
                        help="Lava: graded spikes (Loihi 2) or binary threshold channels (Loihi 1) "
                             "[default: graded].")(f)


def _avg_pool_option(default, auto: bool = False):
    return click.option("--avg-pool", type=click.Choice(["folded", "layer"] + (["auto"] if auto else [])),
                        default=default,
                        help="Lava: average pooling of spikes folded into the next layer's weights, or a pooling "
                             "layer of graded neurons (fewer events where pooled sums are sparse; graded lowering "
                             "only; docs/lava.md)" + ("; auto: the form the loihi2 report keeps on a counting pass "
                                                      "over --data" if auto else "")
                             + (" [default: folded]." if default in (None, "folded") else "."))


def _lava_choice(backends, precision, lowering, avg_pool=None) -> tuple[str, str, str]:
    """--precision/--lowering/--avg-pool apply to the Lava backend only: refuse them elsewhere rather than
    ignore them."""
    if "lava" not in backends:
        given = [o for o, v in (("--precision", precision), ("--lowering", lowering), ("--avg-pool", avg_pool))
                 if v is not None]
        if given:
            raise UserError(f"{given[0]} applies to --backend lava only (got --backend {', '.join(backends)})")
    return precision or "floating_pt", lowering or "graded", avg_pool or "folded"


def _lava_settings(model, ds, precision: str, lowering: str, avg_pool: str = "folded") -> dict:
    """Lava options; the fixed-point input range is the calibration data's (recorded at conversion),
    else the data at hand's."""
    amax = model.metrics.get("input_abs_max")
    if amax is None and ds is not None:
        amax = ds.abs_max()
    return {"precision": precision, "lowering": lowering, "input_abs_max": amax, "avg_pool": avg_pool}


@main.command("evaluate")
@click.argument("converted", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation data.")
@click.option("--backend", type=click.Choice(backend_names()), default="torch",
              help=f"Where the SNN runs: {help_text()}.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--layers", "show_layers", is_flag=True, help="Include per-layer op counts.")
@_lava_options
@data_options
@device_option
@command
def evaluate_cmd(converted, data, backend, limit, batch_size, show_layers, precision, lowering, avg_pool, as_json,
                 **kw):
    """Accuracy of the converted SNN against its ANN, with the paper's energy ratio."""
    from .evaluation import evaluate, format_drop
    from .model_file import load

    precision, lowering, avg_pool = _lava_choice([backend], precision, lowering, avg_pool)
    options, workers = _data_options(kw)
    model = load(converted)
    ds = _model_data(model, converted, data, options, workers, limit)
    r = evaluate(model, ds, backend, limit, batch_size, quiet=as_json,
                 lava=_lava_settings(model, ds, precision, lowering, avg_pool))
    if not show_layers:
        r.layers = None
    text = (f"{r.samples} samples on {backend}: {_describe_fidelity(r)}"
            f"{'; ' + format_drop(r.drop) if r.drop else '; no drop without labels'}\n"
            f"energy ratio {r.energy_ratio:.4f}  "
            f"(#AC_SNN {r.ac_snn:.4g}, #MAC_SNN {r.mac_snn:.4g}, #MAC_ANN {r.mac_ann:.4g} per inference)")
    _emit(as_json, r.to_dict(), text)


@main.command("export")
@click.argument("converted", type=click.Path(dir_okay=False))
@click.option("--target", required=True, type=click.Choice(export_targets()),
              help=f"Format to write: {help_text(export_targets())}.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output path (default: beside the model, with the target's extension); a Lava bundle is a "
                   "folder, replaced as a whole once the new one is complete.")
@click.option("--levels", is_flag=True, help="ONNX: add each SFN site's integer spike levels as outputs.")
@click.option("--ann", is_flag=True, help="ONNX: export the source ANN (every neuron the identity) instead.")
@click.option("--opset", type=click.IntRange(17, 21), default=17, help="ONNX opset.")
@click.option("--partial", is_flag=True,
              help="NIR: write the largest NIR-expressible regions and describe the host-side remainder "
                   "(softmax, LayerNorm, activation products, ...) in the file's metadata (docs/nir.md).")
@click.option("--max-size", type=_FiniteRange(min=0.001), default=None, metavar="GIB",
              help="NIR: refuse an export whose tiled weights and thresholds would exceed this many GiB "
                   "(estimated before anything is built; default 1.5; the export peaks at about 3-4x this).")
@click.option("--lowering", type=click.Choice(["graded", "channels"]), default="graded",
              help="Lava: graded spikes (Loihi 2) or binary threshold channels (Loihi 1).")
@_avg_pool_option("folded", auto=True)
@click.option("--data", default=None, help="Lava: data whose range sets the fixed-point input encoding "
              "(default: the calibration range recorded at conversion), and that --avg-pool auto counts on.")
@command
def export_cmd(converted, target, output, levels, ann, opset, partial, max_size, lowering, avg_pool, data, as_json):
    """Write the converted network in a target format: ONNX file, NIR file, or Lava bundle folder."""
    from .backends import BACKENDS, get_exporter, takes
    from .data import check_not_read, data_paths
    from .model_file import load
    from .outputs import check_output

    accepts = BACKENDS[target].export_options or ()
    if partial and "partial" not in accepts:
        raise UserError(f"--partial applies to --target {', '.join(takes('partial'))} only (got --target {target})")
    if max_size is not None and "max_size" not in accepts:
        raise UserError(f"--max-size applies to --target {', '.join(takes('max_size'))} only (got --target {target})")
    exporter = get_exporter(target)
    path = os.path.splitext(converted)[0] + "." + target if output is None else output
    check_output(path, [converted, *data_paths(data)], folder=exporter.writes_folder)
    check_not_read(path, data)
    model = load(converted)
    if (levels or ann) and "levels" not in accepts:
        raise UserError(f"--levels and --ann apply to --target {', '.join(takes('levels'))} only")
    if avg_pool != "folded" and "avg_pool" not in accepts:
        raise UserError(f"--avg-pool applies to --target {', '.join(takes('avg_pool'))} only (got --target {target})")
    chosen = None
    if avg_pool == "auto":
        avg_pool, chosen = _auto_avg_pool(model, converted, data, lowering)
    options = {"levels": levels, "ann": ann, "opset": opset, "partial": partial, "max_size": max_size,
               "lowering": lowering, "avg_pool": avg_pool}
    if "data" in accepts:       # the range of --data sets the fixed-point input encoding
        options["input_abs_max"] = (_model_data(model, converted, data).abs_max()
                                    if data is not None else model.metrics.get("input_abs_max"))
    info = exporter.export(model, path, **options)
    if chosen is not None:
        info = {**info, "avg_pool": avg_pool, "avg_pool_why": chosen}
    text = exporter.describe_export(info)
    _emit(as_json, {"target": target, **info},
          text if chosen is None else f"{text}\naverage pooling: {avg_pool} ({chosen})")


def _auto_avg_pool(model, path: str, data, lowering: str) -> tuple[str, str]:
    """--avg-pool auto: the form the loihi2 estimate keeps on a counting pass over --data."""
    from .report import avg_pool_choice
    if lowering != "graded":
        return "folded", "threshold channels are binary: a pooling layer needs graded spikes"
    if data is None:
        raise UserError("--avg-pool auto needs --data: the form is chosen on a counting pass over it")
    return avg_pool_choice(model, _model_data(model, path, data))


@main.command("simulate")
@click.argument("converted", type=click.Path())
@click.option("--data", required=True, help="Input data.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(backend_names()),
              default=("torch",),
              help=f"Backend(s) to run (repeatable); each is compared with the torch reference: {help_text()}.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=None, help="CPU threads for every backend.")
@click.option("--against", type=click.Choice(backend_names()), default="torch",
              help="With --per-layer: the backend the others are compared with.")
@click.option("--per-layer", is_flag=True,
              help="Compare every SFN site's spike levels (and pre-activations) between each backend and "
                   "--against; name the first layer that differs.")
@_lava_options
@data_options
@device_option
@command
def simulate_cmd(converted, data, backends, limit, batch_size, threads, against, per_layer, precision, lowering,
                 avg_pool, as_json, **kw):
    """Run the SNN on backends, with timings and agreement against the torch reference.

    CONVERTED is a converted model, or a Lava bundle folder (then only Lava runs, without a reference)."""
    from .model_file import load
    from .simulate import simulate, simulate_bundle

    if os.path.isdir(converted) and avg_pool is not None:
        raise UserError(f"{converted} is a Lava bundle: its average-pooling form was chosen at export "
                        "(--avg-pool applies to a converted model)")
    precision, lowering, avg_pool = _lava_choice(["lava"] if os.path.isdir(converted) else backends, precision,
                                                 lowering, avg_pool)
    options, workers = _data_options(kw)
    if os.path.isdir(converted):
        if set(backends) - {"torch", "lava"} or per_layer:
            raise UserError(f"{converted} is a Lava bundle: it runs on --backend lava only, without --per-layer")
        b = simulate_bundle(converted, _bundle_data(converted, precision, data, options, workers, limit),
                            precision)
        lv = b.lava
        _emit(as_json, b.to_dict(), f"{b.samples} samples on Lava ({precision}, {lv['lowering']} lowering, bundle "
                                    f"{converted}): accuracy {_pct(b.accuracy)}, {b.samples_per_s:.1f} samples/s "
                                    f"(+{b.setup_seconds:.2f} s set-up), latency {lv['latency_steps']} steps; "
                                    f"overflows {lv['overflows']}, saturations {lv['saturations']}")
        return
    model = load(converted)
    ds = _model_data(model, converted, data, options, workers, limit)
    lava = _lava_settings(model, ds, precision, lowering, avg_pool)
    if per_layer:
        from .parity import format_parity, parity
        rows = parity(model, ds, list(backends), against, batch_size, lava)
        if not rows:
            raise UserError(f"--per-layer compares --backend with --against; both are {against}")
        _emit(as_json, {"samples": len(ds), "against": against, "parity": [r.to_dict() for r in rows]},
              "\n\n".join(format_parity(r) for r in rows))
        return
    r = simulate(model, ds, list(backends), batch_size, quiet=as_json, threads=threads, lava=lava)
    lines = [f"{r.samples} samples, reference torch"]
    for b, e in r.backends.items():
        level_agreement = e.details.get("level_agreement")
        extra = f"  levels equal {level_agreement:.4f}%" if "level_agreement" in e.details else ""
        setup = f" (+{e.setup_seconds:.2f} s set-up)" if e.setup_seconds else ""
        scored = (f"cosine {e.cosine:.6f}" if e.cosine is not None else
                  f"accuracy {_pct(e.accuracy)}  max|Δ| {e.max_abs_diff:.3g}  top-1 agreement "
                  f"{e.prediction_agreement:.2f}%")
        if e.cosine is not None:
            scored += f"  max|Δ| {e.max_abs_diff:.3g}"
        lines.append(f"  {b:<6} {e.seconds:8.3f} s{setup}  {e.samples_per_s:9.1f} samples/s  {scored}{extra}")
        if "lava" in e.details:
            lv = e.details["lava"]
            lines.append(f"         Lava {lv['precision']}, {lv['lowering']}: {lv['processes']} processes "
                         f"({lv['neuro_core_processes']} neuro-core, {lv['host_processes']} host: "
                         f"{', '.join(lv['host_ops']) or 'input/output only'}), latency {lv['latency_steps']} steps, "
                         f"{lv['steps_per_s']:.0f} steps/s; overflows {lv['overflows']}, saturations "
                         f"{lv['saturations']}")
        if "integer_reference" in e.details:        # Lava fixed point (exporters/lava/reference.py)
            from .exporters.lava.reference import describe
            lines.append(f"         {describe(e.details['integer_reference'])}")
    _emit(as_json, r.to_dict(), "\n".join(lines))


def _target_help(extra: str = "") -> str:
    from .targets import available
    return f"Hardware target: a shipped name ({', '.join(available())}) or a target .toml file{extra}."


@main.command("report")
@click.argument("converted", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Data to count operations on (e.g. a validation set).")
@click.option("--target", "targets", multiple=True, default=("loihi2", "loihi1", "cmos45"),
              help=_target_help("; repeatable; 'all': every shipped target, ranked in a planning view"))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the report: .html (self-contained, with plots), .md or .json.")
@click.option("--scale", "scales", type=_FiniteRange(0, 1, min_open=True), multiple=True,
              help="Compare at this shared λ in (0, 1] (repeatable).")
@click.option("--levels", "levels", type=click.IntRange(1, 16), multiple=True,
              help="Compare at this M, 1 to 16 (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@data_options
@device_option
@command
def report_cmd(converted, data, targets, output, scales, levels, limit, batch_size, as_json, **kw):
    """Operation counts, core mapping, energy and latency per inference on hardware targets.

    Several model files, or --scale/--levels values, give a side-by-side comparison.
    """
    from .data import check_not_read, data_paths
    from .model_file import atomic_write, load
    from .outputs import check_output
    from .render import to_html, to_markdown, to_text
    from .report import build_report, compare, output_format, variant
    from .targets import expand, load_target
    targets = expand(targets)
    if output is not None:
        check_output(output, [*converted, *data_paths(data), *targets])
        check_not_read(output, data)
    fmt = output_format(output)
    for t in targets:                       # fail on a bad target before the data pass
        load_target(t)
    options, workers = _data_options(kw)
    loaded: dict = {}                       # one data pass per preprocessing the models recorded
    reports = []
    for path in converted:
        model = load(path)
        key = json.dumps([None if model.preprocessing is None else model.preprocessing.to_dict(), model.classes,
                          model.input_shape])
        if key not in loaded:
            loaded[key] = _model_data(model, path, data, options, workers, limit)
        dataset = loaded[key]
        name = os.path.splitext(os.path.basename(path))[0]
        for lam in scales or (None,):
            for m in levels or (None,):
                label = name + (f" λ={lam:g}" if lam is not None else "") + (f" M={m}" if m is not None else "")
                reports.append(build_report(variant(model, lam, m) if lam or m else model, dataset, list(targets),
                                            label=label, batch_size=batch_size, quiet=as_json))
    doc = reports[0] if len(reports) == 1 else compare(reports)
    if output and _writer():
        render = {"json": lambda d: json.dumps(d.to_dict(), indent=1, default=_jsonable), "md": to_markdown,
                  "html": to_html}[fmt]
        text = render(doc)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        atomic_write(output, write)
    summary = to_text(doc) + (f"\nwrote {output}" if output else "")
    _emit(as_json, doc.to_dict(), summary)


@main.command("check")
@click.argument("converted", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help=_target_help())
@click.option("--avg-pool", type=click.Choice(["folded", "layer"]), default="folded", show_default=True,
              help="Average pooling of spikes folded into the next weights, or placed as pooling layers of graded "
                   "neurons (what export --target lava --avg-pool layer builds; graded targets only).")
@command
def check_cmd(converted, target, avg_pool, as_json):
    """Pre-flight hardware check: every violated limit at once. Exit 0 when the network fits, 2 when not."""
    from .model_file import load
    from .report import count_static
    from .targets import load_target
    from .targets.mapping import map_network

    t = load_target(target)
    if avg_pool == "layer" and t.spikes != "graded":
        raise UserError(f"--avg-pool layer needs a target with graded spikes ({t.name}'s are {t.spikes})")
    model = load(converted)
    m = map_network(model.graph, count_static(model), t, avg_pool=avg_pool)
    d = m.to_dict()
    d["layers"] = [{k: p[k] for k in ("name", "op", "cores", "binding")} for p in d["layers"]]
    lines = [f"{converted} on {t.name}: {'fits' if m.fits else 'does NOT fit'}"
             + (f" ({m.cores:,} cores, {m.chips} chip(s); chips bound by {m.chip_binding})" if t.has_cores else "")]
    lines += [f"  violation: {v}" for v in m.violations]
    if t.spikes == "binary" and m.layers:      # what binary spikes cost: the channel lowering
        units = sum(p.units for p in m.layers)
        d["channel_lowering"] = {"neurons": units, "compartments": m.compartments, "synapses": m.synapses}
        lines.append(f"  binary spikes only: each multi-level SFN neuron is lowered to threshold channels, "
                     f"{m.compartments:,} compartments for {units:,} neurons (×{m.compartments / units:.1f}), "
                     f"{m.synapses:,} stored synapses")
    if m.host_work:
        ops = sorted({h["op"] for h in m.host_work})
        n = len(m.host_work)
        where = "not synaptic ops on neuro cores" if t.has_cores else "host operations"
        lines.append(f"  host work ({where}): {n} layer{'s' if n != 1 else ''} ({', '.join(ops)})")
    if m.unchecked:
        lines.append(f"  not checked (no figure in the target file): {', '.join(m.unchecked)}")
    _emit(as_json, d, "\n".join(lines))
    if not m.fits:
        click.echo(f"error: {converted} does not fit {t.name}: {len(m.violations)} violation(s)", err=True)
        sys.exit(2)


@main.command("inspect")
@click.argument("converted", type=click.Path(dir_okay=False))
@command
def inspect_cmd(converted, as_json):
    """A readable summary: layers, SFN sites, thresholds, λ, the search's Pareto front."""
    from .inspect import summary, summary_text
    from .model_file import load

    model = load(converted)
    s = summary(model)
    _emit(as_json, s, summary_text(s))


if __name__ == "__main__":
    main()
