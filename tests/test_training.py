"""Training curves: EfficiencyTracker (PyTorch), EfficiencyCallback (Keras) and their history."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tensorstate_onnx import demo  # noqa: E402
from tensorstate_onnx.accuracy import count_correct  # noqa: E402
from tensorstate_onnx.errors import ModelInputError, OptionError, ProbeMatchError  # noqa: E402
from tensorstate_onnx.history import EfficiencyHistory, EpochRecord  # noqa: E402
from tensorstate_onnx.metrics import aIQ, network_efficiency  # noqa: E402

EPOCHS = 3
TORCH_PROBES = ["conv1", "elu2", "bn3", "dense"]


@pytest.fixture(scope="module")
def digits():
    """The bundled digits split in two: 240 to train on, 120 held out."""
    x, y = demo.load_test_data()
    return (x[:240], y[:240]), (x[240:], y[240:])


def _assert_same(record: EpochRecord, efficiencies: dict, accuracy: float, aiq_weight: int = 2):
    assert list(record.efficiencies) == list(efficiencies)
    for name, value in efficiencies.items():
        assert record.efficiencies[name] == value, name  # exact: the same counts
    expected_network = network_efficiency(list(efficiencies.values()))
    assert record.network_efficiency == expected_network
    assert record.accuracy == accuracy
    assert record.aiq == aIQ(expected_network, accuracy, aiq_weight)


# --------------------------------------------------------------------------- history


def _history() -> EfficiencyHistory:
    return EfficiencyHistory(
        [
            EpochRecord(0, {"a": 0.1, "b": 1 / 3}, 0.18257418583505536, 0.5, 0.3),
            EpochRecord(2, {"a": 0.25, "b": 2 / 7}, 0.2672612419124244, None, None),
        ]
    )


def test_history_json_round_trip(tmp_path):
    history = _history()
    history.to_json(tmp_path / "h.json")
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["records"][0]["efficiencies"] == {"a": 0.1, "b": 1 / 3}
    back = EfficiencyHistory.from_json(tmp_path / "h.json")
    assert back == history
    assert back.epochs == [0, 2] and back.probes == ["a", "b"]


def test_history_csv_round_trip(tmp_path):
    history = _history()
    history.to_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["probe"]) for r in rows] == [("0", "a"), ("0", "b"), ("2", "a"), ("2", "b")]
    assert float(rows[1]["efficiency"]) == 1 / 3
    assert rows[0]["accuracy"] == "0.5" and rows[2]["accuracy"] == "" and rows[2]["aiq"] == ""
    assert EfficiencyHistory.from_csv(tmp_path / "h.csv") == history


def test_history_csv_keeps_records_that_share_an_epoch_apart(tmp_path):
    # A second training phase counting epochs from 0 again, numpy floats, a record without probes.
    history = EfficiencyHistory(
        [
            EpochRecord(0, {"a": 0.5, "b": 0.25}, 0.35, 0.5, 0.4),
            EpochRecord(0, {"a": np.float64(0.75), "b": np.float32(0.5)}, np.float64(0.6), np.float64(0.8), None),
            EpochRecord(0, {"a": 0.75, "b": 0.5}, 0.6, 0.8, None),  # the same values again: still its own record
            EpochRecord(1, {}, 0.0, None, None),
            EpochRecord(1, {"a": 0.1}, 0.1, None, None),
        ]
    )
    history.to_csv(tmp_path / "h.csv")
    back = EfficiencyHistory.from_csv(tmp_path / "h.csv")
    assert len(back) == 5, back
    assert [r.to_dict() for r in back] == [r.to_dict() for r in history]
    assert "np.float" not in (tmp_path / "h.csv").read_text()


def test_history_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"layers": []}')
    with pytest.raises(OptionError, match="not an efficiency history"):
        EfficiencyHistory.from_json(tmp_path / "x.json")
    (tmp_path / "x.csv").write_text("name,efficiency\n")
    with pytest.raises(OptionError, match="not an efficiency history"):
        EfficiencyHistory.from_csv(tmp_path / "x.csv")
    with pytest.raises(OptionError, match="no probe 'c'"):
        _history().efficiency("c")


def test_history_imports_no_framework():
    code = (
        "import sys, tensorstate_onnx.history\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'keras', 'tensorflow', 'matplotlib'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_history_plot(tmp_path):
    pytest.importorskip("matplotlib")
    _history().plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OptionError, match="empty"):
        EfficiencyHistory().plot(tmp_path / "e.png")
    with pytest.raises(OptionError, match="extension"):
        _history().plot(tmp_path / "h.nothing")


# --------------------------------------------------------------------------- PyTorch


def _torch_measure(torch, weights, data, labels):
    """Efficiencies and accuracy of LeNet-5 with ``weights``, measured from scratch."""
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import attach_hooks

    model = LeNet5()
    model.load_state_dict(weights)
    model.eval()
    attach_hooks(model, TORCH_PROBES, keep_states=False)
    with torch.no_grad():
        output = model(torch.as_tensor(data))
    correct, total = count_correct(output.numpy(), labels)
    return {hook.name: hook.efficiency() for hook in model.efficiency_layers}, correct / total


def _torch_train(torch, model, train, tracker, epochs=EPOCHS):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    saved = []
    for epoch in range(epochs):
        model.train()
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
            loss.backward()
            optimizer.step()
        tracker(epoch)
        saved.append(copy.deepcopy(model.state_dict()))
    return saved


@pytest.mark.slow
def test_torch_history_equals_measuring_each_saved_epoch(torch, digits):
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import EfficiencyTracker

    torch.manual_seed(0)
    train, held_out = digits
    model = LeNet5()
    tracker = EfficiencyTracker(model, TORCH_PROBES, held_out[0], held_out[1])
    saved = _torch_train(torch, model, train, tracker)

    assert tracker.history.epochs == [0, 1, 2]
    assert tracker.history.probes == [f"{p}:after" for p in TORCH_PROBES]
    for record, weights in zip(tracker.history, saved, strict=True):
        efficiencies, accuracy = _torch_measure(torch, weights, *held_out)
        _assert_same(record, efficiencies, accuracy)
    # The weights moved, and so did the measurements.
    assert tracker.history[0].efficiencies != tracker.history[-1].efficiencies
    # The trained model carries no hooks and is back in training mode.
    assert not hasattr(model, "efficiency_layers")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training and all(m.training for m in model.modules())


def test_torch_tracker_leaves_the_model_unchanged(torch, digits):
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import EfficiencyTracker

    torch.manual_seed(0)
    _, (x, y) = digits
    model = LeNet5()
    model.train()
    model.bn1.eval()  # a module the user froze stays frozen
    before = copy.deepcopy(model.state_dict())
    tracker = EfficiencyTracker(model, ["conv1", "dense"], x, y, batch_size=50)
    rng = torch.get_rng_state()
    record = tracker.measure(0)
    assert torch.equal(rng, torch.get_rng_state())  # training goes on as it would have
    assert tracker.history == [record] and record.accuracy is not None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too
    assert model.training and not model.bn1.training and model.conv1.training
    assert not hasattr(model, "efficiency_layers")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_torch_tracker_every_n_epochs_and_data_loader(torch, digits):
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import EfficiencyTracker

    torch.manual_seed(0)
    _, (x, y) = digits
    model = LeNet5()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y)),
                                         batch_size=40)  # fmt: skip
    tracker = EfficiencyTracker(model, "Conv2d", loader, every=2, method="both")
    recorded = [tracker(epoch) for epoch in range(5)]
    assert [r is None for r in recorded] == [False, True, False, True, False]
    assert tracker.history.epochs == [0, 2, 4]
    assert len(tracker.history[0].efficiencies) == 6  # 3 convs, before and after
    # One array in one batch gives the same numbers as the loader's batches.
    whole = EfficiencyTracker(model, "Conv2d", x, y, method="both")
    whole.measure(0)
    assert whole.history[0] == tracker.history[0]
    # Without labels: no accuracy, no aIQ.
    unlabelled = EfficiencyTracker(model, "Conv2d", x)
    assert unlabelled.measure(0).accuracy is None and unlabelled.history[0].aiq is None
    # A loader of x alone yields [x] batches: the same efficiencies, no accuracy.
    x_only = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.as_tensor(x)), batch_size=40)
    from_x_only = EfficiencyTracker(model, "Conv2d", x_only).measure(0)
    assert from_x_only.efficiencies == unlabelled.history[0].efficiencies and from_x_only.accuracy is None
    weighted = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y), torch.ones(len(y))), batch_size=40
    )
    with pytest.raises(ModelInputError, match=r"yielded a list of 3 items; the tracker takes batches x, \[x\] or \(x, y\)"):
        EfficiencyTracker(model, "Conv2d", weighted).measure(0)
    assert "efficiency_layers" not in model.__dict__  # its hooks are gone again


def test_torch_tracker_bad_input(torch, digits):
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import EfficiencyTracker, attach_hooks

    _, (x, y) = digits
    model = LeNet5()
    with pytest.raises(ProbeMatchError, match=r"matched no module of LeNet5.*conv1"):
        EfficiencyTracker(model, ["conv9"], x, y)
    for every in (0, -1, 1.5, True):
        with pytest.raises(OptionError, match="every must be an int >= 1"):
            EfficiencyTracker(model, ["conv1"], x, y, every=every)
    with pytest.raises(OptionError, match="aIQ weight"):
        EfficiencyTracker(model, ["conv1"], x, y, aiq_weight=0)
    with pytest.raises(OptionError, match="method"):
        EfficiencyTracker(model, ["conv1"], x, y, method="during")
    with pytest.raises(ValueError, match="120 inputs"):
        EfficiencyTracker(model, ["conv1"], x, y[:5])
    attach_hooks(model, ["conv2"])
    with pytest.raises(OptionError, match="remove_state_layers first"):
        EfficiencyTracker(model, ["conv1"], x, y).measure(0)
    assert [h.name for h in model.efficiency_layers] == ["conv2:after"]  # the user's probes stay


# --------------------------------------------------------------------------- Keras

KERAS_PROBES = ["conv1", "elu2", "bn3", "dense"]


def _channels_last(x):
    return x.transpose(0, 2, 3, 1)


def _keras_measure(weights, data, labels):
    """Efficiencies and accuracy of the Keras LeNet-5 with ``weights``, measured from scratch."""
    from models.keras_models import lenet5
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    model = lenet5()
    model.set_weights(weights)
    probed = build_keras_efficiency_model(model, KERAS_PROBES, keep_states=False)
    output = probed.predict(data, verbose=0)
    correct, total = count_correct(output, labels)
    return {capture.name: capture.efficiency() for capture in probed.efficiency_layers}, correct / total


def _keras_model(keras):
    from models.keras_models import lenet5

    keras.utils.set_random_seed(0)
    model = lenet5()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.mark.slow
def test_keras_history_equals_measuring_each_saved_epoch(keras, digits):
    from tensorstate_onnx.keras_capture import EfficiencyCallback

    (x, y), (x_held, y_held) = digits
    x, x_held = _channels_last(x), _channels_last(x_held)
    model = _keras_model(keras)
    layers_before = [layer.name for layer in model.layers]
    callback = EfficiencyCallback(KERAS_PROBES, x_held, y_held)
    saved = []
    saver = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: saved.append(model.get_weights()))
    model.fit(x, y, epochs=EPOCHS, batch_size=32, callbacks=[callback, saver], verbose=0)

    assert callback.history.epochs == [0, 1, 2]
    assert callback.history.probes == [f"{p}_states" for p in KERAS_PROBES]
    for record, weights in zip(callback.history, saved, strict=True):
        efficiencies, accuracy = _keras_measure(weights, x_held, y_held)
        _assert_same(record, efficiencies, accuracy)
    assert callback.history[0].efficiencies != callback.history[-1].efficiencies
    # The trained model gained no layer and no probes.
    assert [layer.name for layer in model.layers] == layers_before
    assert not hasattr(model, "efficiency_layers")


def test_keras_callback_leaves_the_model_unchanged(keras, digits):
    from tensorstate_onnx.keras_capture import EfficiencyCallback

    _, (x, y) = digits
    x = _channels_last(x)
    model = _keras_model(keras)
    before = [w.copy() for w in model.get_weights()]
    callback = EfficiencyCallback("Conv2D", x, y, every=2, method="both", batch_size=50)
    callback.set_model(model)
    recorded = [callback.measure(epoch) for epoch in range(3)]
    assert [r is None for r in recorded] == [False, True, False]
    assert callback.history.epochs == [0, 2]
    assert len(callback.history[0].efficiencies) == 6  # 3 convs, before and after
    first, second = callback.history
    assert (first.efficiencies, first.accuracy) == (second.efficiencies, second.accuracy)  # same weights
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert not any("states" in layer.name for layer in model.layers)
    unlabelled = EfficiencyCallback("Conv2D", x)
    unlabelled.set_model(model)
    assert unlabelled.measure(0).accuracy is None and unlabelled.history[0].aiq is None


def test_keras_callback_on_an_efficiency_model_leaves_its_probes_to_the_training_data(keras):
    import tensorstate_onnx as ts
    from tensorstate_onnx.keras_capture import EfficiencyCallback

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 2, 64)
    x_held = rng.normal(size=(50, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(7, name="d1", activation="relu"), keras.layers.Dense(2, name="d2")])
    model = ts.build_efficiency_model(base, ["d1"])  # the user's probe: the states seen in training
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = EfficiencyCallback(["d2"], x_held)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert model.efficiency_layers[0].state_count == 2 * 64  # none of the 2 x 50 held-out samples
    assert model.efficiency_layers[0].capture_on
    assert callback.history.epochs == [0, 1] and list(callback.history[0].efficiencies) == ["d2_states"]


def test_keras_callback_on_a_sequential_model_fit_builds(keras):
    from tensorstate_onnx.keras_capture import EfficiencyCallback

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 2, 64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(7, name="d1", activation="relu"), keras.layers.Dense(2, name="d2")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = EfficiencyCallback(["d1"], x[:20], y[:20])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])  # built by fit, after on_train_begin
    (record,) = callback.history
    assert 0 < record.efficiencies["d1_states"] <= 1 and record.accuracy is not None


def test_keras_callback_bad_input(keras, digits):
    from tensorstate_onnx.keras_capture import EfficiencyCallback

    (x, y), (x_held, y_held) = digits
    x, x_held = _channels_last(x), _channels_last(x_held)
    model = _keras_model(keras)
    callback = EfficiencyCallback(["conv9"], x_held, y_held)
    with pytest.raises(ProbeMatchError, match=r"matched no layer of Keras model 'lenet5'.*conv1"):
        model.fit(x[:32], y[:32], epochs=1, callbacks=[callback], verbose=0)
    assert callback.history == []
    for every in (0, -3, 2.0, False):
        with pytest.raises(OptionError, match="every must be an int >= 1"):
            EfficiencyCallback(["conv1"], x_held, y_held, every=every)
    with pytest.raises(OptionError, match="aIQ weight"):
        EfficiencyCallback(["conv1"], x_held, y_held, aiq_weight=1.5)
    with pytest.raises(OptionError, match="method"):
        EfficiencyCallback(["conv1"], x_held, y_held, method="around")
    with pytest.raises(ValueError, match="5 labels for 120 inputs"):
        EfficiencyCallback(["conv1"], x_held, y_held[:5])
    with pytest.raises(OptionError, match="no model yet"):
        EfficiencyCallback(["conv1"], x_held, y_held).measure(0)
