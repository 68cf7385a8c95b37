"""The ``tensorstate-onnx`` command: inspect, analyze and export models, compare reports.

Exit codes: 0 on success, 2 with a one-line message for bad input, 1 for an
internal error (with its traceback, for a bug report).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import traceback
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx

from . import __version__, demo
from ._optional import import_optional
from .datafiles import is_zarr
from .heap import GLIBC_THRESHOLDS, keep_freed_memory
from .errors import (
    MissingFileError,
    ModelFileError,
    ModelInputError,
    OptionError,
    TensorStateError,
    first_line,
)
from .metrics import check_aiq_weight
from .patterns import METHODS

EXIT_BAD_INPUT = 2
_WORKERS_PER_CORE = 4  # a local cluster beyond this only thrashes
EXIT_INTERNAL = 1
EXIT_BROKEN_PIPE = 1  # what Python itself exits with on EPIPE
# A user's mistake or the machine's (a full disk, no permission): one line, exit 2.
# Anything else is a bug in this program: a traceback, exit 1.
_BAD_INPUT = (TensorStateError, OSError)


class _RunFailed(Exception):
    """The run failed for a reason outside this process (a worker kept dying); no traceback helps."""


def _floats(text: str) -> tuple[float, ...]:
    """``0.485,0.456,0.406`` as a tuple of floats (argparse type)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorstate-onnx",
        description="Measure neuron-state efficiency and aIQ of ONNX, Keras and PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="let TensorFlow, PyTorch and onnxruntime print their logs")

    inspect = commands.add_parser("inspect", parents=[common], help="list inputs, outputs, op types and probe-able tensors")
    inspect.add_argument("model", help="path of an .onnx file")
    inspect.add_argument("--all", action="store_true", help="list every node, not only those with a tensor a probe can watch")

    analyze = commands.add_parser("analyze", parents=[common], help="run data through a model and report efficiencies")
    analyze.add_argument("model", nargs="?", help="path of an .onnx file (default: the bundled LeNet-5 digits demo)")
    analyze.add_argument("--data", help=".npy/.npz file or zarr array of inputs (.npz, zarr group: arrays named like the inputs, or x [and y]), or a folder of images")
    analyze.add_argument("--labels", help=".npy file of class labels, one per sample")
    analyze.add_argument("--data-loader-script", metavar="FILE.py[:FUNCTION]", help="a function (default load_data) that returns its data whole or returns or yields batches: arrays, dicts of arrays, or (x, y) pairs")
    analyze.add_argument("--labels-from-folders", action="store_true", help="with a folder of images: each sub-folder is a class (sorted by name)")
    analyze.add_argument("--scale", type=float, help="images: pixel values are multiplied by this (default 1/255) ...")
    analyze.add_argument("--mean", type=_floats, help="... minus this (one or one per channel, comma-separated; default 0) ...")
    analyze.add_argument("--std", type=_floats, help="... divided by this (default 1)")
    analyze.add_argument("--attach-to", nargs="+", default=["Conv"], metavar="NAME", help="op types, node or layer names, globs (default: Conv)")
    analyze.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="names never probed (wins over --attach-to)")
    analyze.add_argument("--method", choices=METHODS, default="after")
    analyze.add_argument("--batch-size", type=int, help="samples per run (default: the model's fixed batch size, or 256, fewer on CPU where a batch's probe outputs would pass 24 MiB)")
    analyze.add_argument("--provider", default="auto", help="auto, cpu or cuda (default: auto)")
    analyze.add_argument("--pack-in-graph", action="store_true", help="quantize and pack inside the ONNX graph")
    analyze.add_argument("--storage", help="directory to keep the raw states (zarr); must not exist or be empty")
    analyze.add_argument("--overwrite", action="store_true", help="replace the state stores in an existing --storage directory")
    analyze.add_argument("--json", help="write the report as JSON")
    analyze.add_argument("--csv", help="write the per-probe table as CSV")
    analyze.add_argument("--plot", help="write a bar chart of efficiency per probe (.png, .svg, .pdf, ...)")
    analyze.add_argument("--firing-plot", metavar="FILE", help="write the firing rate of every neuron, one panel per probe (.png, .svg, ...)")
    analyze.add_argument("--aiq-weight", type=int, default=2, help="weight of accuracy in aIQ (int >= 1, default 2)")
    analyze.add_argument("--workers", type=int, metavar="N", help="shard the data over a local Dask cluster of N worker processes")
    analyze.add_argument("--scheduler", metavar="ADDRESS", help="shard the data over a running Dask cluster (e.g. tcp://host:8786)")
    analyze.add_argument("--partitions", type=int, metavar="P", help="with --workers/--scheduler: reduce the counts in P partitions on the workers (default: one per worker, up to 64)")
    analyze.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="give up on an unreachable --scheduler after this long (default 30)")
    analyze.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show a progress bar (default: on a terminal)")

    compare = commands.add_parser("compare", parents=[common], help="show reports written by analyze --json side by side")
    compare.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports written by analyze --json")
    compare.add_argument("--plot", help="write their efficiencies as grouped bars (.png, .svg, .pdf, ...)")

    export = commands.add_parser("export", parents=[common], help="export a Keras (.keras) or PyTorch (module:factory) model to ONNX")
    export.add_argument("source", help="a .keras file, or 'package.module:factory' returning a torch.nn.Module")
    export.add_argument("output", help="path of the .onnx file to write")
    export.add_argument("--weights", help="PyTorch state_dict file (.pt) to load into the module")
    export.add_argument("--input-shape", help="PyTorch example input shape, e.g. 1,3,96,96")
    export.add_argument("--legacy", action="store_true", help="use the legacy TorchScript exporter (PyTorch)")
    return parser


def _demo_data(args) -> tuple:
    """The demo's held-out digits, the data of a run without ``--data`` (and without a model)."""
    if args.model is not None:
        raise ModelInputError(
            "--data is required when a model is given (a .npy/.npz file, a zarr array or a folder of "
            "images), or --data-loader-script FILE.py[:function]"
        )
    return demo.load_test_data()


def _data_and_labels(args, model) -> tuple:
    """``(data, labels, paired)`` for one process: the demo, a loader script's batches
    (``paired`` when they are ``(x, y)`` pairs, which carry the labels), a folder of
    images, or arrays from ``--data``."""
    from .data import is_whole_data
    from .datafiles import ImageFolder, ImageOptions, load_labels, load_script, read_data

    if args.data_loader_script is not None:
        loaded = load_script(args.data_loader_script)
        if is_whole_data(loaded):  # split into batches of --batch-size by predict/evaluate
            return loaded, None, isinstance(loaded, tuple)
        batches = iter(loaded)
        first = next(batches, None)
        if first is None:
            raise ModelInputError(f"data loader script {args.data_loader_script} gave no batches")
        paired = isinstance(first, (tuple, list)) and len(first) == 2
        return itertools.chain([first], batches), None, paired
    if args.data is None:
        return (*_demo_data(args), False)
    path = Path(args.data)
    if path.is_dir() and not is_zarr(path):
        if len(model.inputs) != 1:
            raise ModelInputError(f"a folder of images feeds a model of one input; this one has {len(model.inputs)}")
        given = {name: getattr(args, name) for name in ("scale", "mean", "std") if getattr(args, name) is not None}
        options = ImageOptions(**given, labels_from_folders=args.labels_from_folders)
        folder = ImageFolder(path, model.inputs[0].shape, options)
        labels = folder.labels if args.labels_from_folders else None
        return folder, load_labels(args.labels) if args.labels is not None else labels, False
    return (*read_data(args.data, args.labels, {spec.name for spec in model.inputs}), False)


def _analyze(args) -> int:
    from .report import summarize

    _check_options_before_run(args)
    model_path = args.model if args.model is not None else str(demo.model_path())
    if args.workers is not None or args.scheduler is not None:
        model, accuracy = _analyze_sharded(args, model_path)
    else:
        model, accuracy = _analyze_here(args, model_path)
    report = summarize(model, accuracy, args.aiq_weight)
    # Files first: a reader that closes the pipe early (`| head -1`) loses none of them.
    if args.json:
        report.write_json(args.json)
    if args.csv:
        report.write_csv(args.csv)
    if args.plot:
        report.plot(args.plot)
    if args.firing_plot:
        report.plot_firing_rates(args.firing_plot)
    if args.model is None:
        print(f"model: bundled demo ({Path(model_path).name}, LeNet-5 on held-out scikit-learn digits)")
    print(report.table())
    return 0


def _check_options_before_run(args) -> None:
    """Refuse report paths that cannot be written, and options that would do
    nothing, before the run, not after it."""
    from .report import check_plot_format

    check_aiq_weight(args.aiq_weight)
    if args.overwrite and args.storage is None:
        raise ModelInputError("--overwrite replaces the state stores in --storage DIR; give --storage too")
    if args.data_loader_script is not None and args.data is not None:
        raise OptionError("give --data or --data-loader-script, not both")
    if args.labels_from_folders and (args.data is None or not Path(args.data).is_dir()):
        raise OptionError("--labels-from-folders goes with --data naming a folder of images (one sub-folder per class)")
    image_options = [f"--{name}" for name in ("scale", "mean", "std") if getattr(args, name) is not None]
    if image_options and (args.data is None or not Path(args.data).is_dir() or is_zarr(Path(args.data))):
        raise OptionError(f"{', '.join(image_options)} apply to --data naming a folder of images; the data here are arrays")
    if args.labels_from_folders and args.labels is not None:
        raise OptionError("give --labels or --labels-from-folders, not both")
    if args.labels is not None and args.data is None:
        raise OptionError("--labels goes with --data (the demo data has its own labels); give --data too")
    if args.partitions is not None:
        if args.workers is None and args.scheduler is None:
            raise OptionError("--partitions splits the reduction of a sharded run; give --workers or --scheduler too")
        if args.partitions <= 0:
            raise OptionError(f"--partitions must be a positive number, got {args.partitions}")
    if args.connect_timeout is not None:
        if args.scheduler is None:
            raise OptionError("--connect-timeout limits the wait for --scheduler; give --scheduler too")
        if not 0 < args.connect_timeout < math.inf:
            raise OptionError(f"--connect-timeout must be a positive number of seconds, got {args.connect_timeout}")

    _refuse_outputs_over_inputs(args)
    for option, path in _report_paths(args):
        target = Path(path)
        if target.is_dir():
            raise ModelInputError(f"{option} {path} is a directory; give a file name")
        parent = target.absolute().parent
        if parent.exists() and not parent.is_dir():
            raise ModelInputError(f"{option} {path}: {parent} is a file, not a directory")
        if not parent.is_dir():
            raise ModelInputError(f"{option} {path}: directory {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise ModelInputError(f"{option} {path} cannot be written (permission denied); choose another path")
    for path in (args.plot, args.firing_plot):
        if path is not None:
            check_plot_format(path)


def _report_paths(args) -> list[tuple[str, str]]:
    """``(option, path)`` of every report file the command line asks for."""
    options = (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot), ("--firing-plot", args.firing_plot))
    return [(option, path) for option, path in options if path is not None]


def _refuse_outputs_over_inputs(args) -> None:
    """Refuse a report path that names an input of the run (the report would
    replace it) or another report's path (one would replace the other)."""
    script = args.data_loader_script.partition(":")[0] if args.data_loader_script else None
    named: dict[Path, str] = {}
    for what, path in (("the model", args.model), ("--data", args.data), ("--labels", args.labels), ("--data-loader-script", script)):
        if path is not None:
            named.setdefault(Path(path).resolve(), f"{what} of this run")
    for option, path in _report_paths(args):
        target = Path(path).resolve()
        if target in named:
            raise OptionError(f"{option} {path} is also {named[target]}: the report would replace it; give another path")
        named[target] = f"the path of {option}"


def _analyze_here(args, model_path: str) -> tuple:
    from .api import build_efficiency_model

    model = build_efficiency_model(
        model_path, args.attach_to, args.exclude, args.method, args.storage,
        providers=args.provider, pack_in_graph=args.pack_in_graph, overwrite=args.overwrite,
    )  # fmt: skip
    data, labels, paired = _data_and_labels(args, model)
    if labels is not None or paired:
        accuracy = model.evaluate(data, labels, batch_size=args.batch_size, progress=args.progress)
    else:
        model.predict(data, batch_size=args.batch_size, progress=args.progress, keep_outputs=False)
        accuracy = None
    return model, accuracy


def _analyze_sharded(args, model_path: str) -> tuple:
    """Shard the data over Dask workers (``--workers`` or ``--scheduler``)."""
    from .errors import ShardFailedError

    if args.workers is not None and args.workers <= 0:
        raise OptionError(f"--workers must be a positive number of processes, got {args.workers}")
    cores = os.cpu_count() or 1
    if args.workers is not None and args.workers > _WORKERS_PER_CORE * cores:
        raise OptionError(
            f"--workers {args.workers} would start more than {_WORKERS_PER_CORE} worker processes per CPU core "
            f"({cores} here); give at most {_WORKERS_PER_CORE * cores}, or run a Dask cluster and pass --scheduler"
        )
    image_folder = args.data is not None and Path(args.data).is_dir() and not is_zarr(Path(args.data))
    if args.data_loader_script is not None or image_folder:
        raise OptionError("loader scripts and image folders run in one process; drop --workers/--scheduler")
    data, labels = _demo_data(args) if args.data is None else (args.data, args.labels)
    try:
        return analyze_cli(
            model_path, data, labels, args.attach_to, args.exclude, args.method, args.batch_size,
            args.workers, args.scheduler, args.storage, args.pack_in_graph, providers=args.provider,
            timeout=30.0 if args.connect_timeout is None else args.connect_timeout, overwrite=args.overwrite, partitions=args.partitions,
        )  # fmt: skip
    except ShardFailedError as exc:
        raise _RunFailed(str(exc)) from exc


def analyze_cli(
    model_path,
    data,
    labels,
    attach_to,
    exclude,
    method,
    batch_size,
    workers,
    scheduler,
    storage,
    pack_in_graph,
    *,
    providers="cpu",
    timeout: float = 30.0,
    overwrite: bool = False,
    partitions: int | None = None,
) -> tuple:
    """What ``tensorstate-onnx analyze --workers N --scheduler ADDRESS`` runs.

    ``data`` is a path (``.npy`` file or zarr directory: read by the workers
    themselves; else a ``.npz`` loaded here, as ``--data`` reads it) or an
    array / dict of arrays; ``labels`` a ``.npy`` path, an array or ``None``.
    ``workers`` starts a LocalCluster of that many processes unless
    ``scheduler`` names a running one; ``partitions`` is ``analyze_sharded``'s
    (None: its default). Returns ``(model, accuracy or None)``: the model's
    captures hold the totals of the counts and every metric, not the states.
    """
    from .datafiles import load_array, load_labels, read_data
    from .distributed import analyze_sharded

    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix == ".npy":
            load_array(data, "data")  # a bad file fails here, in one line
        if path.suffix == ".npy" or path.is_dir():
            data = str(path.absolute())
        else:
            data, stored_labels = read_data(data, None, _input_names(model_path))
            labels = stored_labels if labels is None else labels
    if isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels)
    result = analyze_sharded(
        model_path, data, attach_to, exclude or (), method, labels=labels, batch_size=batch_size,
        n_workers=workers, scheduler=scheduler, storage_path=storage,
        pack_in_graph=pack_in_graph, providers=providers, timeout=timeout, overwrite=overwrite,
        partitions=partitions,
    )  # fmt: skip
    return result.model, result.accuracy


def _input_names(model_path) -> set[str]:
    """The names of the model's inputs (graph inputs that are not initializers)."""
    from .graph import load_model

    graph = load_model(model_path).graph
    initializers = {tensor.name for tensor in graph.initializer}
    return {spec.name for spec in graph.input if spec.name not in initializers}


def _inspect(args) -> int:
    from .graph import list_nodes, load_model

    model = load_model(args.model)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    print(f"model: {args.model}  (opset {opsets})")
    print("inputs:")
    for value in graph.input:
        if value.name not in initializers:
            print(f"  {value.name}  {_type_text(value)}")
    print("outputs:")
    for value in graph.output:
        print(f"  {value.name}  {_type_text(value)}")
    nodes = list_nodes(model)
    counts = Counter(node["op_type"] for node in nodes)
    print("op types:")
    for op, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {op:24s} {count}")
    if args.all:
        print("all nodes (node, op type, labels, output shapes and, for probe-able tensors, neuron axes):")
        listed = nodes
    else:
        print("probe-able tensors (node, op type, labels, output shapes and neuron axes; --all lists every node):")
        listed = [node for node in nodes if any(node["probeable"])]
        if not listed:
            print("  none: no node writes a float activation (--all lists every node)")
    for node in listed:
        labels = ", ".join(node.get("labels", [])) or "-"
        shapes = "; ".join(
            str(shape) + _axis_text(axis, guessed)
            for shape, axis, guessed in zip(node["output_shapes"], node["channel_axes"], node["axes_guessed"])
        )
        print(f"  {node['name']}  {node['op_type']}  [{labels}]  {shapes}")
    if any(any(node["axes_guessed"]) for node in nodes):
        print("axis k?: no rule gives the neuron axis (the last one is taken); choose one with channel_axes")
    return 0


def _axis_text(axis: int | None, guessed: bool) -> str:
    """`` axis k`` (`` axis k?`` when guessed: see channel_axes), or nothing for tensors
    a probe cannot watch."""
    if axis is None:
        return ""
    return f" axis {axis}" + ("?" if guessed else "")


def _type_text(value) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}[{', '.join(dims)}]"


def _compare(args) -> int:
    from .report import check_plot_format, compare_table, plot_comparison, read_reports

    if args.plot is not None:
        check_plot_format(args.plot)
    reports = read_reports(args.reports)
    if args.plot is not None:
        plot_comparison(reports, args.plot)
    print(compare_table(reports))
    return 0


def _export(args) -> int:
    from . import converters

    if args.source.endswith(".keras"):
        if not Path(args.source).is_file():
            raise MissingFileError(f"Keras model file {args.source} does not exist")
        if not zipfile.is_zipfile(args.source):
            raise ModelFileError(f"{args.source} is not a Keras model file (a .keras file is a zip archive); it may be damaged")
        with _native_stderr_hidden(args.verbose):
            keras = import_optional("keras", "keras", "exporting a Keras model")
            try:
                model = keras.models.load_model(args.source)
            except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, ... for a bad file
                raise ModelFileError(f"{args.source} could not be loaded as a Keras model ({first_line(exc)})") from exc
            converters.from_keras(model, path=args.output)
    else:
        module = _torch_module(args)
        shape = _input_shape(args.input_shape)
        torch = import_optional("torch", "torch", "exporting a PyTorch model")
        converters.from_torch(module, (torch.zeros(shape),), path=args.output, dynamo=not args.legacy)
    print(f"wrote {args.output}")
    return 0


def _input_shape(text: str | None) -> tuple[int, ...]:
    """``--input-shape 1,3,224,224`` as a tuple of positive ints."""
    if not text:
        raise OptionError("exporting a PyTorch model needs --input-shape, e.g. --input-shape 1,3,224,224")
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise OptionError(f"--input-shape takes positive ints separated by commas (e.g. 1,3,224,224), got {text!r}")
    return shape


def _torch_module(args):
    import importlib

    torch = import_optional("torch", "torch", "exporting a PyTorch model")
    if ":" not in args.source:
        raise OptionError(f"{args.source!r} is neither a .keras file nor 'package.module:factory'")
    module_name, factory_name = args.source.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), factory_name, None)
    except ImportError as exc:
        raise OptionError(f"cannot import module {module_name!r} of {args.source!r} ({first_line(exc)})") from exc
    if not callable(factory):
        raise OptionError(f"module {module_name} has no factory {factory_name!r} (a function or class that builds a torch module)")
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise OptionError(f"{args.source} built a {type(module).__name__}, not a torch.nn.Module")
    if args.weights:
        try:
            module.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        except FileNotFoundError as exc:
            raise MissingFileError(f"weights file {args.weights} does not exist") from exc
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, ... for weights that do not fit
            raise ModelFileError(
                f"the weights in {args.weights} do not load into {args.source} ({first_line(exc)})"
            ) from exc
    module.eval()
    return module


@contextmanager
def _framework_logs(verbose: bool) -> Iterator[None]:
    """Keep the frameworks' log lines out of the command's output unless ``verbose``.

    onnxruntime and torch.onnx log through settings; TensorFlow's C++ code
    writes to the stderr file descriptor before any setting applies, so while
    a Keras model is loaded and converted that descriptor points at a sink.
    """
    if verbose:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # read when torch is imported: errors only
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # fatal only: its errors reach us as exceptions, said once
    yield


@contextmanager
def _native_stderr_hidden(verbose: bool) -> Iterator[None]:
    """Point the stderr file descriptor at a sink (Python's own ``sys.stderr`` writes too)."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if not any(name in os.environ for name in GLIBC_THRESHOLDS):  # the user's own setting wins
        keep_freed_memory()  # this process is ours: counting reuses what it frees (see heap)
    handlers = {"analyze": _analyze, "inspect": _inspect, "compare": _compare, "export": _export}
    try:
        with _framework_logs(args.verbose):
            code = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`tensorstate-onnx analyze | head -1`): stop quietly.
        # Python's docs: point stdout at devnull so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except _BAD_INPUT as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"tensorstate-onnx: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _RunFailed as exc:
        print(f"tensorstate-onnx: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception:  # an internal error: show everything for a bug report
        traceback.print_exc()
        print("tensorstate-onnx: internal error (please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
