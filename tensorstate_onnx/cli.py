"""The ``tensorstate-onnx`` command: inspect, analyze and export models.

Exit codes: 0 on success, 2 with a one-line message for bad input, 1 for an
internal error (with its traceback, for a bug report).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
import zipfile
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from . import demo
from ._optional import import_optional
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
EXIT_INTERNAL = 1
# A user's mistake or the machine's (a full disk, no permission): one line, exit 2.
# Anything else is a bug in this program: a traceback, exit 1.
_BAD_INPUT = (TensorStateError, OSError)


class _RunFailed(Exception):
    """The run failed for a reason outside this process (a worker kept dying); no traceback helps."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorstate-onnx",
        description="Measure neuron-state efficiency and aIQ of ONNX, Keras and PyTorch models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="let TensorFlow, PyTorch and onnxruntime print their logs")

    inspect = commands.add_parser("inspect", parents=[common], help="list inputs, outputs, op types and probe-able tensors")
    inspect.add_argument("model", help="path of an .onnx file")

    analyze = commands.add_parser("analyze", parents=[common], help="run data through a model and report efficiencies")
    analyze.add_argument("model", nargs="?", help="path of an .onnx file (default: the bundled LeNet-5 digits demo)")
    analyze.add_argument("--data", help=".npy or .npz file of inputs (.npz: arrays named like the inputs, or x [and y])")
    analyze.add_argument("--labels", help=".npy file of class labels, one per sample")
    analyze.add_argument("--attach-to", nargs="+", default=["Conv"], metavar="NAME", help="op types, node or layer names, globs (default: Conv)")
    analyze.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="names never probed (wins over --attach-to)")
    analyze.add_argument("--method", choices=METHODS, default="after")
    analyze.add_argument("--batch-size", type=int, default=256)
    analyze.add_argument("--provider", default="auto", help="auto, cpu or cuda (default: auto)")
    analyze.add_argument("--pack-in-graph", action="store_true", help="quantize and pack inside the ONNX graph")
    analyze.add_argument("--storage", help="directory to keep the raw states (zarr); must not exist or be empty")
    analyze.add_argument("--overwrite", action="store_true", help="replace the state stores in an existing --storage directory")
    analyze.add_argument("--json", help="write the report as JSON")
    analyze.add_argument("--csv", help="write the per-probe table as CSV")
    analyze.add_argument("--plot", help="write a bar chart of efficiency per probe (.png, .svg, .pdf, ...)")
    analyze.add_argument("--aiq-weight", type=int, default=2, help="weight of accuracy in aIQ (int >= 1, default 2)")
    analyze.add_argument("--workers", type=int, metavar="N", help="shard the data over a local Dask cluster of N worker processes")
    analyze.add_argument("--scheduler", metavar="ADDRESS", help="shard the data over a running Dask cluster (e.g. tcp://host:8786)")
    analyze.add_argument("--partitions", type=int, metavar="P", help="with --workers/--scheduler: reduce the counts in P partitions on the workers (default: one per worker, up to 64)")
    analyze.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS", help="give up on an unreachable --scheduler after this long (default 30)")
    analyze.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show a progress bar (default: on a terminal)")

    export = commands.add_parser("export", parents=[common], help="export a Keras (.keras) or PyTorch (module:factory) model to ONNX")
    export.add_argument("source", help="a .keras file, or 'package.module:factory' returning a torch.nn.Module")
    export.add_argument("output", help="path of the .onnx file to write")
    export.add_argument("--weights", help="PyTorch state_dict file (.pt) to load into the module")
    export.add_argument("--input-shape", help="PyTorch example input shape, e.g. 1,3,96,96")
    export.add_argument("--legacy", action="store_true", help="use the legacy TorchScript exporter (PyTorch)")
    return parser


def _load_array(path: str | os.PathLike, what: str) -> np.ndarray | dict:
    file = Path(path)
    if file.is_dir():
        raise ModelInputError(f"{what} file {path} is a directory; pass a .npy or .npz file")
    if not file.is_file():
        raise MissingFileError(f"{what} file {path} does not exist")
    try:
        loaded = np.load(file, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return loaded
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelInputError(f"{what} file {path} is not a readable .npy/.npz file ({exc})") from None


def _load_labels(path: str | os.PathLike) -> np.ndarray:
    labels = _load_array(path, "labels")
    if isinstance(labels, dict):
        raise ModelInputError("--labels takes a .npy file of one label per sample")
    return labels


def _read_data(data_path: str | os.PathLike, labels_path, input_names: set[str]) -> tuple:
    """Inputs and labels from a ``--data`` file and an optional ``--labels`` file.

    A ``.npz`` holds arrays named like the model inputs (and ``y``), or ``x``
    [and ``y``], or a single array; ``--labels`` wins over its ``y``.
    """
    data = _load_array(data_path, "data")
    labels = None
    if isinstance(data, dict):
        if set(data) >= input_names:
            labels = data.get("y") if "y" not in input_names else None
            data = {name: data[name] for name in input_names}
        elif "x" in data:
            labels = data.get("y")
            data = data["x"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise ModelInputError(
                f"{data_path} holds arrays {sorted(data)}; name them like the model inputs "
                f"{sorted(input_names)} or store the inputs as 'x' (and labels as 'y')"
            )
    if labels_path is not None:
        labels = _load_labels(labels_path)
    return data, labels


def _demo_data(args) -> tuple:
    """The demo's held-out digits, the data of a run without ``--data`` (and without a model)."""
    if args.model is not None:
        raise ModelInputError("--data is required when a model is given (a .npy or .npz file of inputs)")
    return demo.load_test_data()


def _data_and_labels(args, model) -> tuple:
    if args.data is None:
        return _demo_data(args)
    return _read_data(args.data, args.labels, {spec.name for spec in model.inputs})


def _analyze(args) -> int:
    from .report import summarize

    _check_options_before_run(args)
    model_path = args.model if args.model is not None else str(demo.model_path())
    if args.workers is not None or args.scheduler is not None:
        model, accuracy = _analyze_sharded(args, model_path)
    else:
        model, accuracy = _analyze_here(args, model_path)
    report = summarize(model, accuracy, args.aiq_weight)
    if args.model is None:
        print(f"model: bundled demo ({Path(model_path).name}, LeNet-5 on held-out scikit-learn digits)")
    print(report.table())
    if args.json:
        report.write_json(args.json)
    if args.csv:
        report.write_csv(args.csv)
    if args.plot:
        report.plot(args.plot)
    return 0


def _check_options_before_run(args) -> None:
    """Refuse report paths that cannot be written, and options that would do
    nothing, before the run, not after it."""
    from .report import check_plot_format

    check_aiq_weight(args.aiq_weight)
    if args.overwrite and args.storage is None:
        raise ModelInputError("--overwrite replaces the state stores in --storage DIR; give --storage too")
    if args.labels is not None and args.data is None:
        raise OptionError("--labels goes with --data (the demo data has its own labels); give --data too")
    if args.partitions is not None:
        if args.workers is None and args.scheduler is None:
            raise OptionError("--partitions splits the reduction of a sharded run; give --workers or --scheduler too")
        if args.partitions <= 0:
            raise OptionError(f"--partitions must be a positive number, got {args.partitions}")
    if not 0 < args.connect_timeout < math.inf:
        raise OptionError(f"--connect-timeout must be a positive number of seconds, got {args.connect_timeout}")

    for option in ("json", "csv", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        target = Path(path)
        if target.is_dir():
            raise ModelInputError(f"--{option} {path} is a directory; give a file name")
        parent = target.absolute().parent
        if not parent.is_dir():
            raise ModelInputError(f"--{option} {path}: directory {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise ModelInputError(f"--{option} {path} cannot be written (permission denied); choose another path")
    if args.plot is not None:
        check_plot_format(args.plot)


def _analyze_here(args, model_path: str) -> tuple:
    from .api import build_efficiency_model

    model = build_efficiency_model(
        model_path, args.attach_to, args.exclude, args.method, args.storage,
        providers=args.provider, pack_in_graph=args.pack_in_graph, overwrite=args.overwrite,
    )  # fmt: skip
    data, labels = _data_and_labels(args, model)
    if labels is not None:
        accuracy = model.evaluate(data, labels, batch_size=args.batch_size, progress=args.progress)
    else:
        model.predict(data, batch_size=args.batch_size, progress=args.progress)
        accuracy = None
    return model, accuracy


def _analyze_sharded(args, model_path: str) -> tuple:
    """Shard the data over Dask workers (``--workers`` or ``--scheduler``)."""
    from .errors import ShardFailedError

    if args.workers is not None and args.workers <= 0:
        raise OptionError(f"--workers must be a positive number of processes, got {args.workers}")
    data, labels = _demo_data(args) if args.data is None else (args.data, args.labels)
    try:
        return analyze_cli(
            model_path, data, labels, args.attach_to, args.exclude, args.method, args.batch_size,
            args.workers, args.scheduler, args.storage, args.pack_in_graph, providers=args.provider,
            timeout=args.connect_timeout, overwrite=args.overwrite, partitions=args.partitions,
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
    from .distributed import analyze_sharded

    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix == ".npy":
            _load_array(data, "data")  # a bad file fails here, in one line
        if path.suffix == ".npy" or path.is_dir():
            data = str(path.absolute())
        else:
            data, stored_labels = _read_data(data, None, _input_names(model_path))
            labels = stored_labels if labels is None else labels
    if isinstance(labels, (str, os.PathLike)):
        labels = np.asarray(_load_labels(labels))
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
    print("probe-able tensors (node, op type, labels, output shapes):")
    for node in nodes:
        labels = ", ".join(node.get("labels", [])) or "-"
        shapes = "; ".join(str(shape) for shape in node.get("output_shapes", []))
        print(f"  {node['name']}  {node['op_type']}  [{labels}]  {shapes}")
    return 0


def _type_text(value) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}[{', '.join(dims)}]"


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

    onnxruntime.set_default_logger_severity(3)
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
    handlers = {"analyze": _analyze, "inspect": _inspect, "export": _export}
    try:
        with _framework_logs(args.verbose):
            return handlers[args.command](args)
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
