"""Throughput of probed ONNX inference against plain onnxruntime, on real exports.

Models, each with every Conv probed (``attach_to="Conv"``):

* the bundled LeNet-5 demo (28x28),
* the hand-built MobileNetV2-style ONNX of ``models/onnx_models.py`` (96x96),
* ``MobileNetV2Small`` (``models/torch_models.py``) exported by
  ``converters.from_torch`` (dynamo), when the torch extra is installed,
* the Keras ``mobilenet_v2_small`` exported by ``converters.from_keras``,
  when the keras extra (TensorFlow, tf2onnx) is installed,

all with random weights (BatchNorm statistics randomized, so states are not
trivially constant) and random normal inputs. For each, in one process, on the
CPU provider with the same session options (graph optimization "all", the same
intra-op threads), after a warm-up, as the median of ``--repeats`` runs with the
modes interleaved (drift hits all alike), it times:

* ``plain``: an onnxruntime session of the unmodified model;
* ``probed session, nothing recorded``: the rewritten session alone, what
  exposing the probes costs onnxruntime (fusions it can no longer apply, the
  copies out of its blocked layouts);
* ``bound``: for models whose Convs feed BatchNorms, the unmodified model with
  each BatchNorm output (a tensor of the probe's size) as an extra output,
  nothing recorded -- a bound on any probing that keeps every fusion;
* ``predict``: ``OnnxEfficiencyModel.predict`` recording every probe (packed
  and counted on the host);
* ``predict, graph pack``: the same with quantize + pack inside the graph;
* ``efficiencies``: ``network_efficiency`` (every probe's efficiency) after a
  ``predict``, reported as a share of that run;
* ``recording alone``: packing and counting every probe on one thread over the
  probed session's outputs computed beforehand, against what ``predict`` adds
  to the probed session (how much of the recording the pipeline hides).

Where the torch extra is installed it also runs ``benchmarks/torch_hooks.py``'s
comparison of the native PyTorch hooks against plain torch, under this
process's memory setting: it is fair to plain torch only with
``--keep-freed-memory`` (see that script).

It prints markdown tables of samples/s with the ratios to plain and of
``predict`` to the probed session. Targets (issue 15): ``predict`` >= 0.8x the
probed session and >= 0.3x plain on the exported MobileNetV2Small, LeNet-5
``predict`` >= 0.85x plain, efficiencies <= 5% of the run.

With ``--keep-freed-memory`` the process first calls
``tensorstate_onnx.keep_freed_memory()`` (as the command line does): freed
memory is reused, not handed back to the OS and faulted in again.

Usage: ``python benchmarks/onnx_overhead.py [--threads N] [--repeats 5] [--keep-freed-memory]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/ is in the repository, not installed

from tensorstate_onnx import OnnxEfficiencyModel, demo, keep_freed_memory, network_efficiency
from models.onnx_models import mobilenet_v2_small_onnx


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------ models


def _torch_mobilenet() -> onnx.ModelProto:
    import torch

    from models.torch_models import mobilenet_v2_small, randomize_batchnorm
    from tensorstate_onnx.converters import from_torch

    torch.manual_seed(0)
    module = randomize_batchnorm(mobilenet_v2_small()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_torch(module, torch.randn(2, 3, 96, 96))


def _keras_mobilenet() -> onnx.ModelProto:
    import keras

    from models.keras_models import mobilenet_v2_small, randomize_batchnorm
    from tensorstate_onnx.converters import from_keras

    keras.utils.set_random_seed(0)  # the same weights, so the same distinct states, in every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_keras(randomize_batchnorm(mobilenet_v2_small()))


def _models(args) -> list[tuple[str, Callable[[], onnx.ModelProto], np.ndarray]]:
    """(name, model factory, inputs) of every model this machine can build."""
    rng = np.random.default_rng(0)
    digits = demo.load_test_data()[0]
    chw = rng.standard_normal((args.mobilenet_samples, 3, 96, 96), dtype=np.float32)
    models = [
        ("LeNet-5 demo (28x28)", lambda: onnx.load(str(demo.model_path())),
         np.resize(digits, (args.demo_samples, *digits.shape[1:]))),
        ("MobileNetV2-style, hand-built ONNX (96x96)", mobilenet_v2_small_onnx, chw),
    ]  # fmt: skip
    if _has("torch"):
        models.append(("MobileNetV2Small, from_torch (96x96)", _torch_mobilenet, chw))
    if _has("keras") and _has("tf2onnx"):
        models.append(("mobilenet_v2_small, from_keras (96x96)", _keras_mobilenet, np.moveaxis(chw, 1, -1).copy()))
    return models


# ------------------------------------------------------------------ runners


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as OnnxEfficiencyModel
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _session_runner(session: ort.InferenceSession, x: np.ndarray, batch: int) -> Callable[[], None]:
    """Every output of ``session`` for all of ``x``, the first joined as predict() joins it."""
    name = session.get_inputs()[0].name

    def run() -> None:
        outputs = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        np.concatenate(outputs)

    return run


def _bound_model(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with the output of each Conv's BatchNormalization as an extra
    output; None when no Conv feeds a BatchNorm."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    names = [
        reader.output[0]
        for node in model.graph.node if node.op_type == "Conv"
        for reader in readers.get(node.output[0], []) if reader.op_type == "BatchNormalization"
    ]  # fmt: skip
    if not names:
        return None
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return exposed


def _recording_alone(host: OnnxEfficiencyModel, x: np.ndarray, batch: int, repeats: int) -> float:
    """Seconds a sample that recording every probe (packing and counting)
    takes on one thread, over the probed session's outputs computed
    beforehand: the work ``predict`` overlaps with the session."""
    name = host.session.get_inputs()[0].name
    outputs = [output.name for output in host.session.get_outputs()]
    batches = [
        (dict(zip(outputs, host.session.run(None, {name: x[i : i + batch]}))), len(x[i : i + batch]))
        for i in range(0, len(x), batch)
    ]
    times = []
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        host.reset_states()
        start = time.perf_counter()
        for values, size in batches:
            for capture in host.efficiency_layers:
                capture.record_outputs(values, size)
        if round_:
            times.append(time.perf_counter() - start)
    host.reset_states()
    return statistics.median(times) / len(x)


def _bench(name: str, model: onnx.ModelProto, x: np.ndarray, batch: int, threads: int, repeats: int) -> dict:
    host = OnnxEfficiencyModel(model, "Conv", providers="cpu", threads=threads)
    packed = OnnxEfficiencyModel(model, "Conv", providers="cpu", threads=threads, pack_in_graph=True)
    modes: dict[str, tuple[Callable[[], None], OnnxEfficiencyModel | None]] = {
        "plain": (_session_runner(_session(model, threads), x, batch), None),
        "probed session, nothing recorded": (_session_runner(host.session, x, batch), None),
    }
    bound = _bound_model(model)
    if bound is not None:
        modes["bound: BatchNorm outputs exposed"] = (_session_runner(_session(bound, threads), x, batch), None)
    modes["predict"] = (lambda: host.predict(x, batch_size=batch, progress=False), host)
    modes["predict, graph pack"] = (lambda: packed.predict(x, batch_size=batch, progress=False), packed)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    efficiencies: list[float] = []
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for mode, (run, probed) in modes.items():
            if probed is not None:
                probed.reset_states()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_:
                times[mode].append(elapsed)
            if probed is host:
                start = time.perf_counter()
                network_efficiency(host)
                if round_:
                    efficiencies.append((time.perf_counter() - start) / elapsed)
    rates = {mode: len(x) / statistics.median(values) for mode, values in times.items()}
    spreads = {mode: (len(x) / max(values), len(x) / min(values)) for mode, values in times.items()}
    states = sum(capture.state_count for capture in host.efficiency_layers) / len(x)
    distinct = sum(capture.distinct_count for capture in host.efficiency_layers)
    return {
        "network": name, "samples": len(x), "probes": len(host.probes), "rates": rates, "spreads": spreads,
        "efficiencies": statistics.median(efficiencies), "states": states, "distinct": distinct,
        "recording": _recording_alone(host, x, batch, repeats),
    }  # fmt: skip


def _print_table(results: list[dict]) -> None:
    print("| network | mode | samples/s (median) | min..max | x plain | x probed session |")
    print("|---|---|---:|---:|---:|---:|")
    for result in results:
        rates, plain = result["rates"], result["rates"]["plain"]
        session = rates["probed session, nothing recorded"]
        for mode, rate in rates.items():
            low, high = result["spreads"][mode]
            versus = f"{rate / session:.2f}" if mode.startswith("predict") else "-"
            print(f"| {result['network']} | {mode} | {rate:,.0f} | {low:,.0f}..{high:,.0f} | "
                  f"{rate / plain:.2f} | {versus} |")
    print()
    for result in results:
        rates = result["rates"]
        added = 1 / rates["predict"] - 1 / rates["probed session, nothing recorded"]
        print(f"- {result['network']}: {result['probes']} probes, {result['samples']} samples, "
              f"{result['states']:,.0f} states per sample, {result['distinct']:,} distinct in total; "
              f"every efficiency after the run: {100 * result['efficiencies']:.1f}% of the run; "
              f"recording alone (one thread, outputs computed beforehand) {1e6 * result['recording']:,.0f} us "
              f"a sample, predict adds {1e6 * added:,.0f} us a sample to the probed session")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=_cpu_count(), help="onnxruntime intra-op threads (all sides)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median is reported)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--demo-samples", type=int, default=1440, help="demo digits, tiled from the 360 held-out ones")
    parser.add_argument("--mobilenet-samples", type=int, default=256)
    parser.add_argument("--no-torch-hooks", action="store_true", help="skip the native torch hooks comparison")
    parser.add_argument("--keep-freed-memory", action="store_true", help="keep_freed_memory() first, as the CLI does")
    args = parser.parse_args(argv)
    kept = keep_freed_memory() if args.keep_freed_memory else False

    results = [
        _bench(name, build(), x, args.batch, args.threads, args.repeats) for name, build, x in _models(args)
    ]
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider; {platform.processor() or platform.machine()}, "
          f"{_cpu_count()} CPUs available, intra-op threads {args.threads}, graph optimization 'all', "
          f"batch {args.batch}, median of {args.repeats} runs after a warm-up; "
          f"freed memory {'kept (keep_freed_memory)' if kept else 'handed back (glibc default)'}")
    print()
    _print_table(results)
    if _has("torch") and not args.no_torch_hooks:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from torch_hooks import print_rows, torch_hook_rows

        print()
        print_rows(torch_hook_rows(threads=args.threads, repeats=args.repeats, batch=args.batch), args.threads)


if __name__ == "__main__":
    main()
