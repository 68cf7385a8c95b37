"""Tests of the ``tensorstate-onnx`` command, in-process through ``cli.main`` and once
as a real console script. Reported numbers are checked against plain onnxruntime
+ numpy."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tensorstate_onnx import cli, demo, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROBES = ["conv1:after", "conv2:after", "conv3:after"]


@pytest.fixture(scope="module")
def expected() -> dict:
    """Per-probe statistics, network efficiency, accuracy and aIQ of the demo, computed
    without the library: plain onnxruntime with the Conv outputs exposed, then numpy."""
    x, y = demo.load_test_data()
    model = onnx.load(str(demo.model_path()))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    for node in convs:
        model.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, *tensors = session.run(None, {"input": x})
    layers = []
    for node, tensor in zip(convs, tensors, strict=True):
        c = tensor.shape[1]
        rows = np.packbits(np.moveaxis(tensor, 1, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")
        counts = np.unique(rows, axis=0, return_counts=True)[1]
        p = counts / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        rates = np.unpackbits(rows, axis=-1, bitorder="little")[:, :c].mean(axis=0)
        layers.append({
            "node": node.name, "neurons": c, "states": len(rows), "distinct_states": len(counts),
            "entropy": entropy, "efficiency": entropy / c, "firing_rates": rates.tolist(),
            "dead_neurons": int((rates == 0).sum()), "always_firing": int((rates == 1).sum()),
        })  # fmt: skip
    net = math.prod(layer["efficiency"] for layer in layers) ** (1 / len(layers))
    accuracy = float(np.mean(logits.argmax(1) == y))
    return {"layers": layers, "net": net, "accuracy": accuracy, "aiq": (net * accuracy**2) ** (1 / 3)}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Data, label and model files, good and bad."""
    root = tmp_path_factory.mktemp("cli")
    x, y = demo.load_test_data()
    paths = {name: root / name for name in (
        "x.npy", "y.npy", "y_short.npy", "xy.npz", "named.npz", "x_only.npz", "odd.npz",
        "text.npy", "truncated.npz", "corrupt.onnx", "full",
    )}  # fmt: skip
    np.save(paths["x.npy"], x)
    np.save(paths["y.npy"], y)
    np.save(paths["y_short.npy"], y[:-1])
    np.savez(paths["xy.npz"], x=x, y=y)
    np.savez(paths["named.npz"], input=x, y=y)
    np.savez(paths["x_only.npz"], x=x)
    np.savez(paths["odd.npz"], a=x, b=y)
    paths["text.npy"].write_text("not a numpy file\n")
    paths["truncated.npz"].write_bytes(paths["xy.npz"].read_bytes()[:5000])
    paths["corrupt.onnx"].write_bytes(demo.model_path().read_bytes()[:3000])
    paths["full"].mkdir()
    (paths["full"] / "keep.txt").write_text("keep")
    paths["model"] = demo.model_path()
    return paths


def _table_rows(out: str) -> dict[str, list[str]]:
    """The probe rows of a printed table, keyed by probe name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["probe", "node"])
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def _figure(out: str, label: str) -> str | None:
    for line in out.splitlines():
        if line.startswith(label):
            return line.split()[-1]
    return None


def _assert_table_matches(out: str, expected: dict, with_accuracy: bool = True) -> None:
    rows = _table_rows(out)
    assert list(rows) == PROBES
    for row, layer in zip(rows.values(), expected["layers"], strict=True):
        assert row == [
            layer["node"], str(layer["neurons"]), str(layer["states"]), str(layer["distinct_states"]),
            str(layer["dead_neurons"]), str(layer["always_firing"]), f"{layer['entropy']:.4f}", f"{layer['efficiency']:.4f}",
        ]  # fmt: skip
    assert _figure(out, "network efficiency:") == f"{expected['net']:.4f}"
    if with_accuracy:
        assert _figure(out, "accuracy:") == f"{expected['accuracy']:.4f}"
        assert _figure(out, "aIQ (weight 2):") == f"{expected['aiq']:.4f}"
    else:
        assert "accuracy" not in out and "aIQ" not in out


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- analyze


def test_analyze_without_a_model_runs_the_demo(capsys, expected):
    code, out, err = _main(capsys, "analyze")
    assert code == 0, err
    assert out.startswith("model: bundled demo (lenet5_digits.onnx, LeNet-5 on held-out scikit-learn digits)\n")
    assert 0.9 < expected["accuracy"] <= 1
    _assert_table_matches(out, expected)


def test_analyze_writes_consistent_json_csv_and_plot(capsys, expected, tmp_path):
    pytest.importorskip("matplotlib")
    paths = {kind: tmp_path / f"report.{kind}" for kind in ("json", "csv", "png", "svg")}
    code, out, err = _main(
        capsys, "analyze", "--json", paths["json"], "--csv", paths["csv"], "--plot", paths["png"],
        "--firing-plot", paths["svg"],
    )  # fmt: skip
    assert code == 0, err
    assert paths["svg"].read_text().count("conv") >= 3  # a panel per probe
    data = json.loads(paths["json"].read_text())
    assert [layer["name"] for layer in data["layers"]] == PROBES
    for got, want in zip(data["layers"], expected["layers"], strict=True):
        assert got["node"] == want["node"]
        assert [got[k] for k in ("neurons", "states", "distinct_states")] == [want[k] for k in ("neurons", "states", "distinct_states")]
        assert [got["entropy"], got["efficiency"]] == pytest.approx([want["entropy"], want["efficiency"]], rel=1e-12)
        for key in ("firing_rates", "dead_neurons", "always_firing"):
            assert got[key] == want[key]  # exactly
    assert data["network_efficiency"] == pytest.approx(expected["net"], rel=1e-12)
    assert data["accuracy"] == expected["accuracy"]
    assert data["aiq"] == pytest.approx(expected["aiq"], rel=1e-12)
    assert data["aiq_weight"] == 2
    with open(paths["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == PROBES
    for row, layer in zip(rows, data["layers"], strict=True):
        assert row["node"] == layer["node"]
        assert "firing_rates" not in row
        for key in ("neurons", "states", "distinct_states", "dead_neurons", "always_firing"):
            assert int(row[key]) == layer[key]
        for key in ("entropy", "efficiency"):
            assert float(row[key]) == layer[key]
        assert float(row["network_efficiency"]) == data["network_efficiency"]
        assert float(row["accuracy"]) == data["accuracy"]
        assert float(row["aiq"]) == data["aiq"]
    for name, cells in _table_rows(out).items():
        layer = next(layer for layer in data["layers"] if layer["name"] == name)
        assert cells[-1] == f"{layer['efficiency']:.4f}"
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "data_args, with_accuracy",
    [
        (("--data", "x.npy", "--labels", "y.npy"), True),
        (("--data", "xy.npz"), True),
        (("--data", "named.npz"), True),
        (("--data", "x_only.npz", "--labels", "y.npy"), True),
        (("--data", "x.npy"), False),
        (("--data", "x_only.npz"), False),
    ],
    ids=["npy+labels", "npz x/y", "npz input-name/y", "npz x+labels", "npy no labels", "npz x only"],
)
def test_analyze_data_files(capsys, expected, files, data_args, with_accuracy):
    args = [files.get(arg, arg) for arg in data_args]
    code, out, err = _main(capsys, "analyze", files["model"], *args, "--batch-size", "100")
    assert code == 0, err
    assert not out.startswith("model: bundled demo")
    _assert_table_matches(out, expected, with_accuracy)


def test_analyze_a_loader_script_of_pairs_gives_the_demo_numbers(capsys, expected, files, tmp_path):
    script = tmp_path / "digits_loader.py"
    script.write_text(
        "from tensorstate_onnx import demo\n"
        "def batches():\n    x, y = demo.load_test_data()\n"
        "    for k in range(0, len(x), 50):\n        yield x[k : k + 50], y[k : k + 50]\n"
    )
    code, out, err = _main(capsys, "analyze", files["model"], "--data-loader-script", f"{script}:batches")
    assert code == 0, err
    _assert_table_matches(out, expected, with_accuracy=True)


def test_a_loader_returning_its_data_whole_is_split_into_batches_of_batch_size(capsys, expected, files, tmp_path, monkeypatch):
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    script = tmp_path / "whole_loader.py"
    script.write_text("from tensorstate_onnx import demo\ndef load_data():\n    return demo.load_test_data()\n")
    runs = []
    run_batch = OnnxEfficiencyModel._run_batch
    monkeypatch.setattr(
        OnnxEfficiencyModel, "_run_batch",
        lambda self, feed, pending: runs.append(len(next(iter(feed.values())))) or run_batch(self, feed, pending),
    )  # fmt: skip
    code, out, err = _main(capsys, "analyze", files["model"], "--data-loader-script", script, "--batch-size", "60")
    assert code == 0, err
    _assert_table_matches(out, expected, with_accuracy=True)
    assert max(runs) == 60 and sum(runs) >= len(demo.load_test_data()[0])  # not one batch of everything


def test_analyze_a_folder_of_images_like_the_array_it_decodes_to(capsys, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from tensorstate_onnx.datafiles import ImageFolder, ImageOptions

    x, y = demo.load_test_data()
    for label in (0, 1):
        folder = tmp_path / "digits" / f"class_{label}"
        folder.mkdir(parents=True)
        for k in np.flatnonzero(y == label)[:6]:
            Image.fromarray((x[k, 0] * 255).clip(0, 255).astype(np.uint8), mode="L").save(folder / f"{k}.png")
    options = ["--scale", "0.00392156862745098", "--mean", "0.1", "--std", "0.9"]
    code, out, err = _main(capsys, "analyze", demo.model_path(), "--data", tmp_path / "digits", "--labels-from-folders", *options)
    assert code == 0, err
    folder = ImageFolder(tmp_path / "digits", [None, 1, 28, 28], ImageOptions(1 / 255, (0.1,), (0.9,), True))
    np.save(tmp_path / "decoded.npy", folder[:])
    np.save(tmp_path / "labels.npy", folder.labels)
    code, same, err = _main(capsys, "analyze", demo.model_path(), "--data", tmp_path / "decoded.npy", "--labels", tmp_path / "labels.npy")
    assert code == 0, err
    assert out == same and _table_rows(out)["conv3:after"][2] == "12"
    bad = {
        ("--std", "nan"): r"--std must be finite numbers above 0, got \(nan,\)",
        ("--std", "-1"): r"--std must be finite numbers above 0",
        ("--mean", "inf"): r"--mean must be finite numbers",
        ("--scale", "0"): r"--scale must be a finite number other than 0",
    }
    for option, message in bad.items():
        code, out, err = _main(capsys, "analyze", demo.model_path(), "--data", tmp_path / "digits", *option)
        assert code == cli.EXIT_BAD_INPUT and re.search(message, err), err
    code, out, err = _main(capsys, "analyze", demo.model_path(), "--data", tmp_path / "decoded.npy", "--scale", "1", "--std", "2")
    assert code == cli.EXIT_BAD_INPUT and "--scale, --std apply to --data naming a folder of images" in err, err
    (tmp_path / "digits" / "stray.png").write_bytes((tmp_path / "digits" / "class_0").iterdir().__next__().read_bytes())
    code, out, err = _main(capsys, "analyze", demo.model_path(), "--data", tmp_path / "digits", "--labels-from-folders")
    assert code == cli.EXIT_BAD_INPUT and "holds images outside any class folder (stray.png)" in err, err


def test_analyze_options(capsys, expected, files, tmp_path):
    store = tmp_path / "states"
    code, out, err = _main(
        capsys, "analyze", "--attach-to", "Conv", "--exclude", "conv2", "--method", "both",
        "--pack-in-graph", "--storage", store, "--provider", "cpu", "--aiq-weight", "3",
    )  # fmt: skip
    assert code == 0, err
    rows = _table_rows(out)
    assert list(rows) == ["conv1:before", "conv1:after", "conv3:before", "conv3:after"]
    assert rows["conv1:after"][-1] == f"{expected['layers'][0]['efficiency']:.4f}"
    assert rows["conv3:after"][-1] == f"{expected['layers'][2]['efficiency']:.4f}"
    assert sorted(p.name for p in store.iterdir()) == ["conv1_after", "conv1_before", "conv3_after", "conv3_before"]
    assert _figure(out, "aIQ (weight 3):") is not None


@pytest.mark.distributed
@pytest.mark.parametrize(
    "data_args",
    [(), pytest.param(("--data", "x.npy", "--labels", "y.npy", "--partitions", "3"), marks=pytest.mark.slow),
     pytest.param(("--data", "named.npz"), marks=pytest.mark.slow)],
    ids=["demo", "npy read by the workers, 3 partitions", "npz loaded here"],
)
def test_analyze_sharded_over_local_workers_matches_one_process(capsys, expected, files, data_args):
    pytest.importorskip("distributed")
    args = [files.get(arg, arg) for arg in data_args]
    model = [files["model"]] if data_args else []
    code, out, err = _main(capsys, "analyze", *model, *args, "--workers", "2", "--batch-size", "64")
    assert code == 0, err
    _assert_table_matches(out, expected)


@pytest.mark.distributed
def test_analyze_cli_on_its_own_local_cluster_gives_single_process_counts(files):
    pytest.importorskip("distributed")
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    x, y = demo.load_test_data()
    reference = OnnxEfficiencyModel(demo.model_path(), ["Conv", "Gemm"], method="both", providers="cpu")
    reference_accuracy = reference.evaluate(x, y, batch_size=64)
    model, accuracy = cli.analyze_cli(
        str(demo.model_path()), str(files["x.npy"]), str(files["y.npy"]), ["Conv", "Gemm"],
        [], "both", 64, 2, None, None, False, partitions=2,
    )  # fmt: skip
    assert accuracy == reference_accuracy
    assert [c.name for c in model.efficiency_layers] == [c.name for c in reference.efficiency_layers]
    for want, have in zip(reference.efficiency_layers, model.efficiency_layers):
        assert have.state_count == want.state_count
        assert have.distinct_count == want.distinct_count
        assert have.n_neurons == want.n_neurons
        for alpha in (0, 0.5, 1, 2, float("inf")):
            assert have.entropy(alpha) == want.entropy(alpha), (want.name, alpha)
        assert have.efficiency() == want.efficiency()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--workers", "0"], "--workers must be a positive number of processes, got 0"),
        (["analyze", "--workers", "99999"], "--workers 99999 would start more than 4 worker processes per CPU core"),
        # A refused port is refused at once, not after the (long) timeout.
        (["analyze", "--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "120"],
         r"nothing listens at tcp://127\.0\.0\.1:9 \(connection refused\)"),
        (["analyze", "--scheduler", "foo://bar"], "unknown scheme 'foo' in the scheduler address 'foo://bar'"),
        (["analyze", "--scheduler", "tcp://localhost"], "not a Dask scheduler address .*missing port"),
        (["analyze", "--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "-1"],
         "--connect-timeout must be a positive number of seconds, got -1.0"),
        (["analyze", "--workers", "2", "--connect-timeout", "5"], "--connect-timeout limits the wait for --scheduler; give --scheduler too"),
        (["analyze", "model", "--data", "text.npy", "--workers", "2"], "data file .*text.npy is not a .npy/.npz file"),
        (["analyze", "model", "--data", "full", "--workers", "2"], "image folders run in one process; drop --workers"),
        (["analyze", "--workers", "2", "--partitions", "0"], "--partitions must be a positive number, got 0"),
        (["analyze", "--partitions", "2"], "--partitions splits the reduction of a sharded run; give --workers"),
        (["analyze", "--workers", "1", "--partitions", "100000"], "partitions=100000 is more than this run can use"),
    ],
    ids=["no workers", "too many workers", "refused port", "unknown scheme", "no port", "negative timeout", "timeout without a scheduler",
         "bad data file", "image folder", "zero partitions", "partitions alone", "too many partitions"],
)  # fmt: skip
def test_sharded_bad_input_exits_2_with_one_line(capsys, files, argv, message):
    pytest.importorskip("distributed")
    argv = [str(files[arg]) if arg in files else arg for arg in argv]
    code, out, err = _main(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_inspect_lists_inputs_outputs_and_op_types(capsys, files):
    code, out, err = _main(capsys, "inspect", files["model"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"model: {files['model']}  (opset ai.onnx 17)"
    assert lines[1:5] == ["inputs:", "  input  float[N, 1, 28, 28]", "outputs:", "  logits  float[N, 10]"]
    ops = lines[lines.index("op types:") + 1 : lines.index("op types:") + 7]
    assert {op.split()[0]: int(op.split()[1]) for op in ops} == {
        "BatchNormalization": 3, "Conv": 3, "Elu": 3, "MaxPool": 2, "Flatten": 1, "Gemm": 1,
    }  # fmt: skip
    assert "  /conv1/Conv  Conv  [conv1]  (None, 20, 24, 24) axis 1" in lines
    assert "  /dense/Gemm  Gemm  [dense]  (None, 10) axis 1" in lines
    assert not any("axis k?" in line for line in lines)  # nothing guessed


def test_the_command_line_keeps_freed_memory_for_its_run(capsys, files, monkeypatch):
    kept = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: kept.append(True) or True)
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = _main(capsys, "inspect", files["model"])
    assert code == 0, err
    assert kept == [True]  # once, before the command runs (see tensorstate_onnx.heap)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own glibc setting wins
    code, _, err = _main(capsys, "inspect", files["model"])
    assert code == 0, err
    assert kept == [True]


def _listed_nodes(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("probe-able tensors", "all nodes")))
    return [line.split()[0] for line in lines[start + 1 :] if line.startswith("  ")]


def test_inspect_lists_only_probeable_tensors_unless_all(capsys, tmp_path, shape_math_model):
    model = tmp_path / "shapes.onnx"
    onnx.save_model(shape_math_model, str(model))
    code, out, err = _main(capsys, "inspect", model)
    assert code == 0, err
    assert "probe-able tensors (node, op type, labels, output shapes and neuron axes; --all lists every node):" in out
    assert _listed_nodes(out) == ["relu", "add"]
    code, out, err = _main(capsys, "inspect", model, "--all")
    assert code == 0, err
    assert _listed_nodes(out) == ["relu", "shape", "to_float", "scale", "zeros", "add", "to_int"]
    assert "  relu  Relu  [-]  (None, 3, 4, 4) axis 3?" in out.splitlines()  # no rule: the last axis, guessed
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["i"], name="to_int", to=TensorProto.INT64)], "ints",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 3])],
    )  # fmt: skip
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "ints.onnx"))
    code, out, err = _main(capsys, "inspect", tmp_path / "ints.onnx")
    assert code == 0, err
    assert out.splitlines()[-1] == "  none: no node writes a float activation (--all lists every node)"


def test_version(capsys):
    from tensorstate_onnx import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"tensorstate-onnx {__version__}\n"


def test_a_probe_with_a_single_state_is_named_under_the_table(capsys, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["x"], ["n"], name="neg")],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3]) for name in ("r", "n")],
    )  # fmt: skip
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "two.onnx"))
    x = np.array([[-1, 0, 1]] * 4 + [[1, 1, -1]] * 2, np.float32)  # Neg fires {0} or {2}
    np.save(tmp_path / "x.npy", x)
    argv = ("analyze", tmp_path / "two.onnx", "--data", tmp_path / "x.npy", "--attach-to", "Relu", "Neg")
    code, out, err = _main(capsys, *argv)
    assert code == 0, err
    assert "why 0" not in out
    np.save(tmp_path / "x.npy", x[:4])  # Relu fires {2}, Neg {0}: one state each
    code, out, err = _main(capsys, *argv[:-1])
    assert code == 0, err
    lines = out.splitlines()
    assert _table_rows(out)["relu:after"][1:6] == ["3", "4", "1", "2", "1"]  # neurons, states, distinct, dead, always
    assert lines[lines.index("network efficiency: 0.0000") + 1] == (
        "why 0: probe relu:after (the same 1 of 3 neurons fired on every input) saw a single state on this data, "
        "so efficiency 0 (the network efficiency is the geometric mean)"
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "missing.onnx", "--data", "x.npy"], "ONNX model file missing.onnx does not exist"),
        (["analyze", "corrupt.onnx", "--data", "x.npy"], "could not be parsed as an ONNX model"),
        (["inspect", "corrupt.onnx"], "could not be parsed as an ONNX model"),
        (["analyze", "--attach-to", "LSTM"], r"attach_to \['LSTM'\] matched no op type.*Op types present: "),
        (["analyze", "model", "--data", "text.npy"], "data file .*text.npy is not a .npy/.npz file .it starts with neither numpy.s nor zip.s signature"),
        (["analyze", "model", "--data", "truncated.npz"], "data file .*truncated.npz is not a readable .npy/.npz file"),
        (["analyze", "model", "--data", "missing.npy"], "data file missing.npy does not exist"),
        (["analyze", "model", "--data", "odd.npz"], r"holds arrays \['a', 'b'\]; name them like the model inputs"),
        (["analyze", "model", "--data", "x.npy", "--labels", "y_short.npy"], "got 359 labels for 360 samples"),
        (["analyze", "model", "--data", "x.npy", "--labels", "xy.npz"], "--labels takes a .npy file"),
        (["analyze", "--batch-size", "0"], "batch_size must be a positive int, got 0"),
        (["analyze", "--storage", "full"], "storage path .*full already exists and is not empty"),
        (["analyze", "--provider", "tpu"], "unknown provider 'tpu'"),
        (["analyze", "model"], "--data is required when a model is given"),
        (["analyze", "--aiq-weight", "0"], "aIQ weight must be an int from 1 to 1,000,000, got 0"),
        (["analyze", "model", "--data", "full"], "full holds no images .*pass a folder of images, a .npy/.npz file or a zarr array"),
        (["analyze", "model", "--data", "x.npy", "--labels", "full"], "labels file .*full is a directory"),
        (["analyze", "--labels", "y_short.npy"], "--labels goes with --data"),
        (["analyze", "model", "--data", "x.npy", "--data-loader-script", "x.py"], "give --data or --data-loader-script, not both"),
        (["analyze", "model", "--data", "x.npy", "--labels-from-folders"], "--labels-from-folders goes with --data naming a folder"),
        (["analyze", "model", "--data-loader-script", "missing.py"], "data loader script missing.py does not exist"),
        (["analyze", "--json", "x.npy/report.json"], r"--json .*x.npy/report.json: .*x.npy is a file, not a directory"),
        (["analyze", "--storage", "x.npy/states"], r"storage path .*x.npy/states lies under .*x.npy, which is a file"),
    ],
    ids=[
        "missing model", "corrupt model", "inspect corrupt model", "attach-to nothing", "text data file",
        "truncated npz", "missing data file", "npz without known names", "labels mismatch",
        "npz labels", "batch size 0", "existing storage", "unknown provider", "model without data",
        "aiq weight 0", "data folder", "labels folder", "labels without data", "report under a file",
        "storage under a file", "data and loader script", "labels from folders of a file", "missing loader script",
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(capsys, files, argv, message):
    # "x.npy/report.json": a path under the file x.npy
    argv = [str(files[arg.split("/")[0]]) + arg[len(arg.split("/")[0]):] if arg.split("/")[0] in files else arg for arg in argv]
    code, out, err = _main(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("tensorstate-onnx: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(p.name for p in files["full"].iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "option, name, message",
    [
        ("--json", "missing/report.json", r"--json .*report.json: directory .*missing does not exist; create it first"),
        ("--csv", "full", r"--csv .*full is a directory; give a file name"),
        ("--plot", "chart.txt", r"cannot plot to .*chart.txt': txt extension; use one of .*png"),
        ("--plot", "chart", r"cannot plot to .*chart': no extension"),
        ("--firing-plot", "missing/rates.png", r"--firing-plot .*rates.png: directory .*missing does not exist"),
        ("--firing-plot", "rates.txt", r"cannot plot to .*rates.txt': txt extension"),
    ],
    ids=[
        "json in a missing directory", "csv onto a directory", "plot format", "plot without extension",
        "firing plot in a missing directory", "firing plot format",
    ],
)  # fmt: skip
def test_report_paths_are_checked_before_the_run(capsys, files, option, name, message):
    target = files["full"] if name == "full" else files["full"].parent / name
    code, out, err = _main(capsys, "analyze", option, target)
    assert code == cli.EXIT_BAD_INPUT
    assert out == ""  # refused before any sample ran
    assert err.count("\n") == 1 and re.search(message, err), err
    assert sorted(p.name for p in files["full"].iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "inputs, reports, message",
    [
        (["model.onnx", "--data", "x.npy"], ["--json", "model.onnx"], r"--json .*model.onnx is also the model of this run: the report would replace it"),
        (["model.onnx", "--data", "x.npy"], ["--csv", "./x.npy"], r"--csv .*x.npy is also --data of this run"),
        (["model.onnx", "--data", "x.npy", "--labels", "y.npy"], ["--json", "y.npy"], r"--json .*y.npy is also --labels of this run"),
        (["model.onnx", "--data-loader-script", "loader.py:batches"], ["--csv", "loader.py"], r"--csv .*loader.py is also --data-loader-script"),
        (["model.onnx", "--data", "x.npy"], ["--json", "r.json", "--csv", "sub/../r.json"], r"--csv .*r.json is also the path of --json"),
    ],
    ids=["json onto the model", "csv onto the data", "json onto the labels", "csv onto the loader script", "two reports, one file"],
)  # fmt: skip
def test_a_report_path_that_names_an_input_or_another_report_is_refused(capsys, files, tmp_path, monkeypatch, inputs, reports, message):
    """Nothing is replaced: the run's inputs stay byte for byte as they were."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.onnx").write_bytes(files["model"].read_bytes())
    for name in ("x.npy", "y.npy"):
        (tmp_path / name).write_bytes(files[name].read_bytes())
    (tmp_path / "loader.py").write_text("def batches():\n    return []\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, out, err = _main(capsys, "analyze", *inputs, *reports)
    assert code == cli.EXIT_BAD_INPUT and out == "", err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_stores_in_an_existing_storage(capsys, expected, tmp_path):
    from tensorstate_onnx.store import StateStore

    store = tmp_path / "states"
    assert _main(capsys, "analyze", "--storage", store)[0] == 0
    first = StateStore.open(store / "conv1_after")
    rows = len(first)
    code, out, err = _main(capsys, "analyze", "--storage", store)
    assert code == cli.EXIT_BAD_INPUT and "--overwrite on the command line" in err
    code, out, err = _main(capsys, "analyze", "--storage", store, "--overwrite")
    assert code == 0, err
    again = StateStore.open(store / "conv1_after")
    assert len(again) == rows > 0  # replaced, not appended to
    assert _table_rows(out)["conv1:after"][-1] == f"{expected['layers'][0]['efficiency']:.4f}"


def test_overwrite_with_fewer_probes_leaves_no_store_of_the_earlier_run(capsys, tmp_path):
    store = tmp_path / "states"
    assert _main(capsys, "analyze", "--storage", store, "--attach-to", "Conv", "Gemm")[0] == 0
    (store / "notes.txt").write_text("mine")
    before = sorted(p.name for p in store.iterdir())
    assert "dense_after" in before, before
    code, out, err = _main(capsys, "analyze", "--storage", store, "--attach-to", "Conv", "--overwrite")
    assert code == 0, err
    after = sorted(p.name for p in store.iterdir())
    assert after == sorted(set(before) - {"dense_after"}), after  # the Gemm store is gone, the notes stay
    assert (store / "notes.txt").read_text() == "mine"
    # A run that fails before writing anything deletes nothing.
    for failing in (["--data", tmp_path / "missing.npy"], ["--attach-to", "NoSuchOp"]):
        code, out, err = _main(capsys, "analyze", "--storage", store, "--overwrite", *failing)
        assert code == cli.EXIT_BAD_INPUT, err
        assert sorted(p.name for p in store.iterdir()) == after


def test_a_full_disk_exits_2_with_one_line_and_keeps_what_was_stored(capsys, monkeypatch, tmp_path):
    import errno

    from tensorstate_onnx import store as store_module

    monkeypatch.setattr(store_module, "STATE_CHUNK_BYTES", 4096)  # many chunk writes per probe
    real_write = store_module.StateStore._write
    writes = []

    def write_until_full(self, start, data):
        if len(writes) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append((self.path.name, start + data.shape[0]))
        real_write(self, start, data)

    monkeypatch.setattr(store_module.StateStore, "_write", write_until_full)
    code, out, err = _main(capsys, "analyze", "--storage", tmp_path / "states")
    assert code == cli.EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert "No space left on device" in err
    monkeypatch.undo()
    assert cli.main(["analyze", "--storage", str(tmp_path / "full")]) == 0
    expected_rows = _full_rows(tmp_path / "full")
    stored = {name: end for name, end in writes}
    for directory in (tmp_path / "states").iterdir():
        kept = store_module.StateStore.open(directory)
        assert not kept.complete and len(kept) == stored.get(directory.name, 0)
        assert np.array_equal(kept.read(), expected_rows[directory.name][: len(kept)])
    capsys.readouterr()


def _full_rows(root: Path) -> dict[str, np.ndarray]:
    from tensorstate_onnx.store import StateStore

    return {d.name: StateStore.open(d).read() for d in root.iterdir()}


def test_analyze_feeds_a_fixed_batch_model_its_batch_size(capsys, tmp_path):
    from onnx import helper as h

    graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"], name="relu")], "batch_one",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])], [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
    )  # fmt: skip
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), tmp_path / "batch_one.onnx")
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = _main(capsys, "analyze", tmp_path / "batch_one.onnx", "--data", tmp_path / "x.npy", "--attach-to", "Relu")
    assert code == 0, err
    distinct = len(np.unique(np.packbits(x > 0, axis=-1, bitorder="little"), axis=0))
    assert _table_rows(out)["relu:after"][2:4] == ["7", str(distinct)]


def test_overwrite_without_storage_is_refused_before_the_run(capsys):
    code, out, err = _main(capsys, "analyze", "--overwrite")
    assert code == cli.EXIT_BAD_INPUT and out == ""
    assert err.count("\n") == 1 and "give --storage too" in err, err


def test_unparsable_arguments_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", "--batch-size", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_internal_error_exits_1_with_traceback(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug in the report")

    monkeypatch.setattr(report, "summarize", broken)
    code, out, err = _main(capsys, "analyze")
    assert code == cli.EXIT_INTERNAL == 1
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: simulated bug in the report" in err
    assert err.rstrip().endswith("internal error (please report it with the traceback above)")


# ---------------------------------------------------------------- killed runs

_KILLABLE_RUN = (
    "import sys; from tensorstate_onnx import cli, store; "
    "store.STATE_CHUNK_BYTES = 1 << 12; "  # small chunks: many writes to be killed between
    "sys.exit(cli.main(sys.argv[1:]))"
)


def _killable(storage: Path, data: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", _KILLABLE_RUN, "analyze", "--data", str(data), "--batch-size", "7",
            "--provider", "cpu", "--storage", str(storage), "--no-progress"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"NUMBA_THREADING_LAYER": "workqueue"})


@pytest.mark.slow
def test_runs_killed_at_random_moments_leave_stores_with_a_prefix_of_the_rows(tmp_path):
    from tensorstate_onnx.store import StateStore

    x, _ = demo.load_test_data()
    data = tmp_path / "x.npy"
    np.save(data, np.concatenate([x, x]))
    started = time.perf_counter()
    whole = _killable(tmp_path / "whole", data)
    while not (tmp_path / "whole").exists() and whole.poll() is None:
        time.sleep(0.01)
    first_store = time.perf_counter() - started
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()
    duration = time.perf_counter() - started
    expected_rows = _full_rows(tmp_path / "whole")
    assert all(StateStore.open(tmp_path / "whole" / name).complete for name in expected_rows)
    rng = np.random.default_rng(20)
    killed = partial = 0
    for k in range(40):
        if killed == 20:
            break
        storage = tmp_path / f"killed{k}"
        run = _killable(storage, data)
        time.sleep(first_store + rng.uniform(0.0, 0.9 * (duration - first_store)))
        run.send_signal(signal.SIGKILL)
        code = run.wait(timeout=60)
        if code == 0:
            continue  # it finished first
        killed += 1
        for directory in storage.iterdir() if storage.exists() else ():
            if not (directory / "zarr.json").exists():
                continue  # killed before the array's metadata was written
            store = StateStore.open(directory)
            rows, want = store.read(), expected_rows[directory.name]
            if store.complete:  # killed after the stream ended, while reporting
                assert np.array_equal(rows, want), directory
            else:
                assert np.array_equal(rows, want[: len(rows)]), directory
                partial += 0 < len(rows) < len(want)
    assert killed == 20 and partial >= 10, (killed, partial)


# ---------------------------------------------------------------- console script


def _console_script() -> Path:
    script = Path(sys.executable).with_name("tensorstate-onnx")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    return script


def test_console_script_analyze(expected, tmp_path):
    result = subprocess.run(
        [str(_console_script()), "analyze", "--provider", "cpu"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_table_matches(result.stdout, expected)


@pytest.mark.parametrize("command", [["inspect", str(demo.model_path())], ["analyze", "--json", "r.json"]])
def test_a_closed_pipe_ends_quietly(tmp_path, command):
    """`tensorstate-onnx ... | head -0`: the reader is gone before anything is written."""
    process = subprocess.Popen(
        [str(_console_script()), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == cli.EXIT_BROKEN_PIPE
    assert err == ""
    if command[0] == "analyze":
        assert json.loads((tmp_path / "r.json").read_text())["network_efficiency"] > 0  # written all the same


def test_console_script_bad_input(tmp_path):
    result = subprocess.run(
        [str(_console_script()), "analyze", "missing.onnx", "--data", "x.npy"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "tensorstate-onnx: error: ONNX model file missing.onnx does not exist; check the path\n"


# ---------------------------------------------------------------- export


def test_export_torch_factory_with_weights_matches_the_module(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    from models.torch_models import lenet5

    torch.manual_seed(3)
    module = lenet5().eval()
    weights = tmp_path / "lenet.pt"
    torch.save(module.state_dict(), weights)
    out = tmp_path / "lenet.onnx"
    code, stdout, err = _main(
        capsys, "export", "models.torch_models:lenet5", out,
        "--weights", weights, "--input-shape", "1,1,28,28",
    )  # fmt: skip
    assert code == 0, err
    assert stdout == f"wrote {out}\n"
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})  # batch 5: the batch axis is dynamic
    with torch.no_grad():
        np.testing.assert_allclose(logits, module(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    code, stdout, err = _main(capsys, "analyze", out, "--data", _save(tmp_path / "x.npy", x), "--attach-to", "Conv2d")
    assert code == 0, err
    assert list(_table_rows(stdout)) == ["conv1:after", "conv2:after", "conv3:after"]


def test_export_keras_file_matches_the_model(capsys, tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    from models.keras_models import lenet5

    model = lenet5()
    saved = tmp_path / "lenet.keras"
    model.save(saved)
    out = tmp_path / "lenet.onnx"
    code, stdout, err = _main(capsys, "export", saved, out)
    assert code == 0, err
    x = np.random.default_rng(1).standard_normal((4, 28, 28, 1)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(logits, keras.ops.convert_to_numpy(model(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "models.torch_models:lenet5", "out.onnx"], "needs --input-shape"),
        (["export", "not_a_factory", "out.onnx"], "neither a .keras file nor 'package.module:factory'"),
        (["export", "models.torch_models:missing", "out.onnx", "--input-shape", "1,1,28,28"],
         "module models.torch_models has no factory 'missing'"),
        (["export", "no_such_package.models:make", "out.onnx", "--input-shape", "1,3"], "No module named 'no_such_package'"),
    ],
    ids=["no input shape", "not a factory", "missing factory", "missing package"],
)  # fmt: skip
def test_export_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, message):
    pytest.importorskip("torch")
    code, out, err = _main(capsys, *[str(tmp_path / a) if a == "out.onnx" else a for a in argv])
    assert code == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "out.onnx").exists()


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _one_line_error(capsys, *argv) -> str:
    code, out, err = _main(capsys, *argv)
    assert (code, out) == (cli.EXIT_BAD_INPUT, ""), (code, err)
    assert err.startswith("tensorstate-onnx: error: ") and err.count("\n") == 1, err
    return err


def _model_with_a_gather(path: Path, opset: int = 17) -> Path:
    """x [N, 4] float -> Gather of rows of a 3-row table by the int64 ids in ``ids`` [N]."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [3, 4], np.arange(12, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("Add", ["rows", "x"], ["y"])],
        "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
                   helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[table],
    )  # fmt: skip
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_onnxruntime_failures_are_bad_input_with_the_model_named(capsys, tmp_path):
    model = _model_with_a_gather(tmp_path / "gather.onnx")
    np.savez(tmp_path / "bad_ids.npz", ids=np.array([0, 7]), x=np.ones((2, 4), np.float32))
    err = _one_line_error(capsys, "analyze", model, "--data", tmp_path / "bad_ids.npz", "--attach-to", "Add")
    assert "onnxruntime failed to run the model" in err and "gather.onnx" in err
    model = onnx.load(str(model))
    model.graph.node[1].op_type = "NoSuchOp"
    onnx.save_model(model, str(tmp_path / "unknown_op.onnx"))
    err = _one_line_error(capsys, "analyze", tmp_path / "unknown_op.onnx", "--data", tmp_path / "bad_ids.npz",
                          "--attach-to", "Gather")  # fmt: skip
    assert re.search(r"(onnxruntime cannot load the model|not a valid ONNX model)", err), err


def test_options_refused_before_the_run(capsys, tmp_path):
    err = _one_line_error(capsys, "analyze", "--aiq-weight", "1" + "0" * 400)
    assert "aIQ weight must be an int from 1 to 1,000,000" in err


@pytest.mark.slow
def test_framework_logs_stay_out_of_stderr_unless_verbose(tmp_path):
    pytest.importorskip("keras")
    keras_file = tmp_path / "dense.keras"
    build = (
        "import keras; m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation='relu')]); "
        f"m.save({str(keras_file)!r})"
    )
    subprocess.run([sys.executable, "-c", build], check=True, capture_output=True, timeout=300)
    quiet = subprocess.run(
        [sys.executable, "-m", "tensorstate_onnx.cli", "export", str(keras_file), str(tmp_path / "a.onnx")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stdout.strip().startswith("wrote ") and quiet.stderr == "", quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-m", "tensorstate_onnx.cli", "export", str(keras_file), str(tmp_path / "b.onnx"), "--verbose"],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )  # fmt: skip
    assert loud.returncode == 0 and loud.stderr.strip(), "--verbose lets the framework log"


def test_export_user_errors_exit_2(capsys, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out.onnx"
    factory = "models.torch_models:lenet5"
    cases = [
        (("export", "no_such_module_here:build", out, "--input-shape", "1,1,28,28"), "cannot import module"),
        (("export", "models.torch_models:nothing", out, "--input-shape", "1,1,28,28"), "has no factory 'nothing'"),
        (("export", "models.torch_models:MOBILENET_V2_SMALL_STEM", out, "--input-shape", "1"), "has no factory"),
        (("export", factory, out, "--input-shape", "1,-1,28,28"), "--input-shape takes positive ints"),
        (("export", factory, out, "--input-shape", "a,b"), "--input-shape takes positive ints"),
        (("export", factory, out, "--input-shape", "1,1,28,28", "--weights", tmp_path / "none.pt"),
         "weights file .*none.pt does not exist"),
    ]  # fmt: skip
    (tmp_path / "junk.pt").write_bytes(b"not torch weights")
    cases.append((("export", factory, out, "--input-shape", "1,1,28,28", "--weights", tmp_path / "junk.pt"),
                  "the weights in .*junk.pt do not load"))  # fmt: skip
    if importlib.util.find_spec("keras") is not None:
        (tmp_path / "corrupt.keras").write_bytes(b"PK\x03\x04 not really a zip")
        (tmp_path / "text.keras").write_text("a text file named .keras")
        cases += [(("export", tmp_path / "corrupt.keras", out), "corrupt.keras is not a Keras model file .*may be damaged"),
                  (("export", tmp_path / "text.keras", out), "text.keras is not a Keras model file"),
                  (("export", tmp_path / "missing.keras", out), "Keras model file .*missing.keras does not exist")]
    for argv, message in cases:
        assert re.search(message, _one_line_error(capsys, *argv)), argv
    assert not out.exists()


# ---------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's report with Conv probed (aIQ weight 2), and with Conv and Gemm (aIQ weight 3)."""
    root = tmp_path_factory.mktemp("compare")
    for argv in (
        ["analyze", "--json", root / "convs.json"],
        ["analyze", "--attach-to", "Conv", "Gemm", "--exclude", "conv1", "--aiq-weight", "3", "--json", root / "gemm.json"],
    ):
        assert cli.main([str(arg) for arg in argv]) == 0
    return root / "convs.json", root / "gemm.json"


def test_compare_prints_reports_side_by_side(capsys, two_reports):
    first, second = two_reports
    code, out, err = _main(capsys, "compare", first, second)
    assert code == 0, err
    a, b = (json.loads(path.read_text()) for path in two_reports)
    lines = out.splitlines()
    assert lines[0].split() == ["probe", "convs", "gemm"]
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in lines[2:] if line.strip()}

    def cell(report, name):
        found = [layer["efficiency"] for layer in report["layers"] if layer["name"] == name]
        return f"{found[0]:.4f}" if found else "-"

    names = ["conv1:after", "conv2:after", "conv3:after", "dense:after"]
    assert [line.split()[0] for line in lines[2:6]] == names  # first report's probes first
    for name in names:
        assert rows[name] == [cell(a, name), cell(b, name)]
    assert rows["conv1:after"][1] == "-" and rows["dense:after"][0] == "-"
    assert rows["network efficiency"] == [f"{a['network_efficiency']:.4f}", f"{b['network_efficiency']:.4f}"]
    assert rows["accuracy"] == [f"{a['accuracy']:.4f}", f"{b['accuracy']:.4f}"]
    assert rows["aIQ"] == [f"{a['aiq']:.4f}", f"{b['aiq']:.4f}"]
    assert lines[-1] == "aIQ weights differ (convs 2, gemm 3): their aIQ values do not compare"


def test_compare_plot_and_repeated_names(capsys, two_reports, tmp_path):
    pytest.importorskip("matplotlib")
    copy = tmp_path / "convs.json"
    copy.write_text(two_reports[0].read_text())
    code, out, err = _main(capsys, "compare", two_reports[0], copy, "--plot", tmp_path / "compare.png")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["probe", str(two_reports[0]), str(copy)]  # same names: the paths
    assert "aIQ (weight 2)" in out and "differ" not in out
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"report file .*missing.json does not exist"),
        ("not json", r"bad.json is not a report JSON \(written by analyze --json\): Expecting value"),
        ("[1, 2]", r"bad.json is not a report JSON .*it needs 'layers'"),
        ('{"layers": [{"name": "a"}], "network_efficiency": 0.5}', r"bad.json is not a report JSON .*'efficiency'"),
        ('{"layers": [], "network_efficiency": "high"}', r"bad.json is not a report JSON"),
        ("dir", r"report .*bad.json is a directory"),
        ('{"layers": [{"name": "a", "efficiency": NaN}], "network_efficiency": 0.5}', r"not a sound report: its efficiency of 'a' is nan, not a number in \[0, 1\]"),
        ('{"layers": [{"name": "a", "efficiency": 1.7}], "network_efficiency": 0.5}', r"its efficiency of 'a' is 1.7"),
        ('{"layers": [], "network_efficiency": -3}', r"its network_efficiency is -3"),
        ('{"layers": [], "network_efficiency": 0.5, "accuracy": 5}', r"its accuracy is 5"),
        ('{"layers": [], "network_efficiency": 0.5, "aiq_weight": 1.5}', r"its aiq_weight is 1.5, not an int >= 1"),
    ],
    ids=["missing", "not json", "a list", "layer without efficiency", "network not a number", "directory",
         "nan efficiency", "efficiency above 1", "negative network efficiency", "accuracy of 5", "fractional weight"],
)
def test_compare_bad_input_exits_2_with_one_line(capsys, two_reports, tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    err = _one_line_error(capsys, "compare", two_reports[0], path)
    assert re.search(message, err), err


def test_compare_refuses_a_plot_format_before_reading(capsys, two_reports, tmp_path):
    err = _one_line_error(capsys, "compare", *two_reports, "--plot", tmp_path / "chart.txt")
    assert "cannot plot to" in err and "txt extension" in err


def test_truncated_external_data_is_named_as_the_cause(capfd, tmp_path):
    model = onnx.load(str(demo.model_path()))
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code = cli.main(["analyze", str(tmp_path / "m.onnx")])
    out, err = capfd.readouterr()
    assert code == cli.EXIT_BAD_INPUT and out == ""
    assert err.count("\n") == 1 and "onnxruntime:" not in err.replace("onnxruntime cannot", ""), err
    assert re.search(r"external data .* cannot be read in full; the files are damaged or truncated", err), err


def test_a_failed_run_is_one_line_without_onnxruntime_s_own_error_log(capfd, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"]), helper.make_node("Relu", ["emb"], ["y"])],
        "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])], [weight],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "lookup.onnx")
    np.save(tmp_path / "ids.npy", np.full((2, 5), 50, np.int64))  # past the table's 10 rows
    code = cli.main(["analyze", str(tmp_path / "lookup.onnx"), "--data", str(tmp_path / "ids.npy"), "--attach-to", "Relu"])
    out, err = capfd.readouterr()
    assert code == cli.EXIT_BAD_INPUT and out == ""
    assert err.count("\n") == 1 and "[E:onnxruntime" not in err, err
    assert "indices element out of data bounds" in err
