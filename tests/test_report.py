"""Tests of the analysis report (table, JSON, CSV, plot) on a model whose states are
known by hand."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tensorstate_onnx import OnnxEfficiencyModel, aIQ
from tensorstate_onnx.report import AnalysisReport, LayerSummary, summarize

# Relu fires where x > 0: 1001 x4, 0100 x2, 0000, 1111 -> H = 1.75 bits of 4.
# Neg fires where x < 0:  0100 x4, 1000 x2, 0000 x2   -> H = 1.5 bits of 4.
X = np.array(
    [[1, -1, 0, 2]] * 4 + [[-1, 1, 0, 0]] * 2 + [[0, 0, 0, 0], [3, 3, 3, 3]],
    dtype=np.float32,
)
# argmax of relu(X) per row is 3, 3, 3, 3, 1, 1, 0, 0: seven of these labels match.
Y = np.array([3, 3, 3, 3, 1, 1, 0, 1])
# Firing rates (per neuron, fraction of the 8 states); Neg never fires on neurons 2 and 3 (x >= 0 there).
RELU_RATES = [5 / 8, 3 / 8, 1 / 8, 5 / 8]
NEG_RATES = [2 / 8, 4 / 8, 0.0, 0.0]
RELU_EFF = 1.75 / 4
NEG_EFF = 1.5 / 4
NET = math.sqrt(RELU_EFF * NEG_EFF)
ACCURACY = 7 / 8
AIQ = (NET * ACCURACY**2) ** (1 / 3)


@pytest.fixture(scope="module")
def tiny() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["x"], ["n"], name="neg")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("r", "n")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def report(tiny) -> AnalysisReport:
    model = OnnxEfficiencyModel(tiny, ["Relu", "Neg"], providers="cpu")
    accuracy = model.evaluate(X, Y, batch_size=3, progress=False)
    assert accuracy == ACCURACY
    return summarize(model, accuracy, aiq_weight=2)


def test_summary_values(report):
    assert report.layers == [
        LayerSummary("relu:after", "relu", 4, 8, 4, pytest.approx(1.75), pytest.approx(RELU_EFF), 1, 0, 0, RELU_RATES),
        LayerSummary("neg:after", "neg", 4, 8, 3, pytest.approx(1.5), pytest.approx(NEG_EFF), 1, 2, 0, NEG_RATES),
    ]
    assert report.network_efficiency == pytest.approx(NET)
    assert report.accuracy == ACCURACY
    assert report.aiq == pytest.approx(AIQ) == aIQ(NET, ACCURACY, 2)
    assert report.aiq_weight == 2


def test_table(report):
    lines = report.table().splitlines()
    assert lines[0].split() == ["probe", "node", "neurons", "states", "distinct", "dead", "always", "entropy", "efficiency"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["relu:after", "relu", "4", "8", "4", "0", "0", "1.7500", "0.4375"]
    assert lines[3].split() == ["neg:after", "neg", "4", "8", "3", "2", "0", "1.5000", "0.3750"]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    assert lines[4] == ""
    assert lines[5] == f"network efficiency: {NET:.4f}"
    assert lines[6] == f"accuracy:           {ACCURACY:.4f}"
    assert lines[7] == f"aIQ (weight 2):     {AIQ:.4f}"
    assert len(lines) == 8


def test_json(report, tmp_path):
    path = tmp_path / "report.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert set(data) == {"layers", "network_efficiency", "accuracy", "aiq", "aiq_weight", "extra"}
    assert [layer["name"] for layer in data["layers"]] == ["relu:after", "neg:after"]
    assert data["layers"][0] == {
        "name": "relu:after", "node": "relu", "neurons": 4, "states": 8, "distinct_states": 4,
        "entropy": pytest.approx(1.75), "efficiency": pytest.approx(RELU_EFF), "channel_axis": 1,
        "dead_neurons": 0, "always_firing": 0, "firing_rates": RELU_RATES,
    }  # fmt: skip
    assert data["layers"][1]["firing_rates"] == NEG_RATES and data["layers"][1]["dead_neurons"] == 2
    assert data["layers"][1]["efficiency"] == pytest.approx(NEG_EFF)
    assert data["network_efficiency"] == pytest.approx(NET)
    assert data["accuracy"] == ACCURACY
    assert data["aiq"] == pytest.approx(AIQ)
    assert data["aiq_weight"] == 2
    assert path.read_text().endswith("}\n")


def test_csv(report, tmp_path):
    path = tmp_path / "report.csv"
    report.write_csv(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "name", "node", "neurons", "states", "distinct_states", "entropy", "efficiency", "channel_axis",
        "dead_neurons", "always_firing", "network_efficiency", "accuracy", "aiq",
    ]  # fmt: skip
    assert [(int(r["dead_neurons"]), int(r["always_firing"])) for r in rows] == [(0, 0), (2, 0)]
    assert [int(r["channel_axis"]) for r in rows] == [1, 1]
    assert [(r["name"], r["node"], int(r["neurons"]), int(r["states"]), int(r["distinct_states"])) for r in rows] == [
        ("relu:after", "relu", 4, 8, 4),
        ("neg:after", "neg", 4, 8, 3),
    ]
    assert [float(r["efficiency"]) for r in rows] == pytest.approx([RELU_EFF, NEG_EFF])
    assert [float(r["entropy"]) for r in rows] == pytest.approx([1.75, 1.5])
    for row in rows:
        assert float(row["network_efficiency"]) == pytest.approx(NET)
        assert float(row["accuracy"]) == ACCURACY
        assert float(row["aiq"]) == pytest.approx(AIQ)


def test_report_without_accuracy(tiny, tmp_path):
    model = OnnxEfficiencyModel(tiny, "Relu", providers="cpu")
    model.predict(X, progress=False)
    report = summarize(model)
    assert report.accuracy is None and report.aiq is None and report.aiq_weight is None
    table = report.table()
    assert "accuracy" not in table and "aIQ" not in table
    assert table.splitlines()[-1] == f"network efficiency: {RELU_EFF:.4f}"
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["accuracy"] is None and data["aiq"] is None
    report.write_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["accuracy"] == "" and row["aiq"] == ""
    assert float(row["network_efficiency"]) == pytest.approx(RELU_EFF)


def test_a_probe_with_a_single_state_zeroes_the_network_efficiency(tiny):
    model = OnnxEfficiencyModel(tiny, ["Relu", "Neg"], providers="cpu")
    model.evaluate(np.ones((5, 4), np.float32), np.zeros(5, np.int64), progress=False)
    report = summarize(model, 1.0, aiq_weight=1)
    assert [layer.distinct_states for layer in report.layers] == [1, 1]
    assert [layer.efficiency for layer in report.layers] == [0.0, 0.0]
    assert report.network_efficiency == 0.0 and report.aiq == 0.0
    lines = report.table().splitlines()
    assert "aIQ (weight 1):     0.0000" in lines
    note = lines[lines.index("network efficiency: 0.0000") + 1]
    assert note == (
        "why 0: probes relu:after (all 4 neurons fired on every input), neg:after (none of its 4 "
        "neurons ever fired: all values <= 0) saw a single state on this data, so efficiency 0 "
        "(the network efficiency is the geometric mean)"
    )


def test_one_single_state_probe_is_named_with_the_neurons_that_fired(tiny):
    model = OnnxEfficiencyModel(tiny, ["Relu", "Neg"], providers="cpu")
    x = np.tile(np.array([[1.0, -1.0, 0.0, 2.0]], np.float32), (6, 1))
    x[3:, 1] = 1.0  # rows 0-2: Relu fires {0, 3}, Neg {1}; rows 3-5: Relu {0, 1, 3}, Neg nothing
    model.predict(x, progress=False)
    report = summarize(model)
    assert [layer.distinct_states for layer in report.layers] == [2, 2]
    assert report.zero_efficiency_notes() == []  # nothing at 0
    model.reset_states()
    model.predict(x[:3], progress=False)
    report = summarize(model)
    assert report.zero_efficiency_notes() == [
        "why 0: probes relu:after (the same 2 of 4 neurons fired on every input), neg:after (the same 1 of 4 "
        "neurons fired on every input) saw a single state on this data, so efficiency 0 (the network "
        "efficiency is the geometric mean)"
    ]


def test_bad_aiq_weight(tiny):
    model = OnnxEfficiencyModel(tiny, "Relu", providers="cpu")
    model.predict(X, progress=False)
    with pytest.raises(ValueError, match="aIQ weight must be an int from 1 to 1,000,000, got 0"):
        summarize(model, 0.5, aiq_weight=0)


def test_plot_writes_a_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "efficiency.png"
    report.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


def test_plot_firing_rates_writes_a_panel_per_probe(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "rates.svg"
    report.plot_firing_rates(path)
    text = path.read_text()
    assert "relu:after" in text and "neg:after" in text
    assert "2 dead, 0 always firing" in text


def test_plot_firing_rates_needs_rates(tmp_path):
    pytest.importorskip("matplotlib")
    bare = AnalysisReport([LayerSummary("a", "a", 4, 8, 2, 1.0, 0.25)], 0.25)
    with pytest.raises(ValueError, match="holds no firing rates to plot"):
        bare.plot_firing_rates(tmp_path / "rates.png")
