"""Throughput of probed ONNX inference against plain onnxruntime.

For the bundled LeNet-5 demo and the MobileNetV2-style ONNX (96x96, random
weights), in one process, this times

* ``plain``: an onnxruntime session of the unmodified model,
* ``host pack``: ``OnnxEfficiencyModel.predict`` with every Conv output probed,
  the probes quantized and packed by the engine (``pack_in_graph=False``),
* ``graph pack``: the same with quantize + pack inside the ONNX graph
  (``pack_in_graph=True``),

all on the CPU provider with the same session options (graph optimization
"all", the same intra-op thread count), after a warm-up run, as the median of
``--repeats`` runs (modes interleaved, so drift hits all of them alike). It
prints a markdown table of samples/s and the ratio to plain; the target is a
ratio >= 0.67 in the better probed mode. Another row runs the probed session
with nothing recorded: the share of the cost that is onnxruntime computing and
copying out the probed tensors (fusions it can no longer apply), not the engine.
A last row, for models whose Convs feed BatchNorms, is a bound on any probing:
the unmodified model with each BatchNorm output (a tensor of the probe's size)
as an extra output, no Conv computed twice and nothing recorded.

Usage: ``python benchmarks/onnx_overhead.py [--threads N] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/ is in the repository, not installed

from tensorstate_onnx import OnnxEfficiencyModel, demo
from models.onnx_models import mobilenet_v2_small_onnx

TARGET = 0.67


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _plain_runner(model: onnx.ModelProto, x: np.ndarray, batch: int, threads: int) -> Callable[[], None]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run() -> None:
        outputs = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        np.concatenate(outputs)  # predict() joins its outputs too

    return run


def _probed_runner(model: onnx.ModelProto, x: np.ndarray, batch: int, threads: int, pack_in_graph: bool):
    probed = OnnxEfficiencyModel(
        model, "Conv", providers="cpu", optimization="all", threads=threads, pack_in_graph=pack_in_graph
    )

    def run() -> None:
        probed.predict(x, batch_size=batch, progress=False)

    return run, probed


def _session_only_runner(probed: OnnxEfficiencyModel, x: np.ndarray, batch: int) -> Callable[[], None]:
    """The probed session with nothing recorded: what exposing the probes costs onnxruntime."""
    name = probed.inputs[0].name

    def run() -> None:
        for i in range(0, len(x), batch):
            probed.session.run(None, {name: x[i : i + batch]})

    return run


def _exposed_runner(model: onnx.ModelProto, x: np.ndarray, batch: int, threads: int) -> Callable[[], None] | None:
    """A bound on any probing of this model: the plain session with the output of
    each Conv's BatchNormalization (a tensor of the probe's size) as an extra
    output -- no Conv computed twice, nothing recorded, only the fusions exposing
    a tensor blocks and the copying out. ``None`` when no Conv feeds a BatchNorm."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph = exposed.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    names = [
        reader.output[0]
        for node in graph.node if node.op_type == "Conv"
        for reader in readers.get(node.output[0], []) if reader.op_type == "BatchNormalization"
    ]  # fmt: skip
    if not names:
        return None
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return _plain_runner(exposed, x, batch, threads)


def _bench(name: str, model: onnx.ModelProto, x: np.ndarray, batch: int, threads: int, repeats: int) -> list[dict]:
    plain = _plain_runner(model, x, batch, threads)
    host, host_model = _probed_runner(model, x, batch, threads, pack_in_graph=False)
    graph, graph_model = _probed_runner(model, x, batch, threads, pack_in_graph=True)
    modes = {
        "plain": (plain, None),
        "host pack": (host, host_model),
        "graph pack": (graph, graph_model),
        "probed session, nothing recorded": (_session_only_runner(host_model, x, batch), None),
    }
    exposed = _exposed_runner(model, x, batch, threads)
    if exposed is not None:
        modes["bound: Conv->BatchNorm outputs exposed, nothing recorded"] = (exposed, None)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for mode, (run, probed) in modes.items():
            if probed is not None:
                probed.reset_states()
            start = time.perf_counter()
            run()
            if round_:
                times[mode].append(time.perf_counter() - start)
    states = sum(capture.state_count for capture in host_model.efficiency_layers)
    distinct = sum(len(capture.counts()) for capture in host_model.efficiency_layers)
    base = len(x) / statistics.median(times["plain"])
    rows = []
    for mode, values in times.items():
        rate = len(x) / statistics.median(values)
        rows.append({
            "network": name, "mode": mode, "rate": rate, "ratio": rate / base,
            "spread": (len(x) / max(values), len(x) / min(values)),
            "probes": len(host_model.probes), "states": states / len(x), "distinct": distinct,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=_cpu_count(), help="onnxruntime intra-op threads (both sides)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median is reported)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--demo-samples", type=int, default=1440, help="demo digits, tiled from the 360 held-out ones")
    parser.add_argument("--mobilenet-samples", type=int, default=256)
    args = parser.parse_args(argv)

    digits = demo.load_test_data()[0]
    demo_x = np.resize(digits, (args.demo_samples, *digits.shape[1:]))
    mobile_x = np.random.default_rng(0).standard_normal((args.mobilenet_samples, 3, 96, 96), dtype=np.float32)
    rows = _bench("LeNet-5 demo (28x28)", onnx.load(str(demo.model_path())), demo_x, args.batch, args.threads, args.repeats)
    rows += _bench("MobileNetV2-style (96x96)", mobilenet_v2_small_onnx(), mobile_x, args.batch, args.threads, args.repeats)

    print(f"onnxruntime {ort.__version__}, providers used: CPUExecutionProvider "
          f"(available: {', '.join(ort.get_available_providers())})")
    print(f"{platform.processor() or platform.machine()}, {_cpu_count()} CPUs available, "
          f"intra-op threads {args.threads} on both sides, graph optimization 'all', batch {args.batch}, "
          f"median of {args.repeats} runs after a warm-up")
    print()
    print("| network | mode | probes | samples | samples/s (median) | min..max | x plain |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        samples = args.demo_samples if row["network"].startswith("LeNet") else args.mobilenet_samples
        low, high = row["spread"]
        probes = "-" if row["mode"] == "plain" else row["probes"]
        print(f"| {row['network']} | {row['mode']} | {probes} | {samples} | {row['rate']:,.0f} | "
              f"{low:,.0f}..{high:,.0f} | {row['ratio']:.2f} |")
    print()
    for network in dict.fromkeys(row["network"] for row in rows):
        probed = [row for row in rows if row["network"] == network and row["mode"] in ("host pack", "graph pack")]
        best = max(probed, key=lambda row: row["ratio"])
        verdict = "meets" if best["ratio"] >= TARGET else "misses"
        print(f"- {network}: better mode {best['mode']} at {best['ratio']:.2f}x plain ({verdict} the "
              f"{TARGET}x target); {best['states']:,.0f} states per sample, "
              f"{best['distinct']:,} distinct states in total over the run")


if __name__ == "__main__":
    main()
