"""Tests of the Keras front end: the StateCapture layer and build_keras_efficiency_model."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from tensorstate_onnx import (  # noqa: E402
    ProbeMatchError,
    StorageExistsError,
    build_efficiency_model,
    network_efficiency,
    reset_efficiency_model,
)
from tensorstate_onnx.engine import pack  # noqa: E402
from tensorstate_onnx.keras_capture import StateCapture, build_keras_efficiency_model  # noqa: E402
from models.keras_models import lenet5, lenet5_sequential  # noqa: E402
from tensorstate_onnx.store import StateStore  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="these tests run Keras on TensorFlow"
)


def _pairs(capture):
    return sorted(zip(capture.state_ids(), capture.counts().tolist(), strict=True))


def _reference(values, axis=-1):
    ids, counts = np.unique(pack(np.asarray(values, dtype=np.float32), axis), axis=0, return_counts=True)
    return sorted(zip((row.tobytes() for row in ids), counts.tolist(), strict=True))


def _layer_values(model, name, x, before=False):
    layer = model.get_layer(name)
    tensor = layer.input if before else layer.output
    return keras.Model(model.inputs, tensor).predict(x, verbose=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(48, 28, 28, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def functional():
    keras.utils.set_random_seed(0)
    return lenet5()


@pytest.fixture(scope="module")
def sequential():
    keras.utils.set_random_seed(0)
    return lenet5_sequential()


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_after_captures_match_reference_in_predict(kind, request, images):
    model = request.getfixturevalue(kind)
    before = model.predict(images, verbose=0)
    n_layers = len(model.layers)
    probed = build_keras_efficiency_model(model, ["Conv2D"])
    assert type(probed) is type(model)
    assert probed is not model and len(model.layers) == n_layers
    assert [c.name for c in probed.efficiency_layers] == ["conv1_states", "conv2_states", "conv3_states"]
    assert all(isinstance(c, StateCapture) for c in probed.efficiency_layers)
    assert [c.label for c in probed.efficiency_layers] == ["conv1", "conv2", "conv3"]
    names = [layer.name for layer in probed.layers]
    assert names.index("conv1_states") == names.index("conv1") + 1
    # The layers, and so the weights, are the given model's own.
    for layer in model.layers:
        if type(layer).__name__ != "InputLayer":  # inputs are new, like clone_model's
            assert probed.get_layer(layer.name) is layer
    out = probed.predict(images, batch_size=16, verbose=0)
    np.testing.assert_allclose(out, before, atol=1e-5)
    assert not probed.run_eagerly
    for capture, name, per_instance in zip(probed.efficiency_layers, ["conv1", "conv2", "conv3"], [576, 64, 1], strict=True):
        assert capture.state_count == 48 * per_instance
        assert capture.states_per_instance == per_instance
        assert _pairs(capture) == _reference(_layer_values(model, name, images))
    # The given model still computes exactly what it did.
    np.testing.assert_array_equal(model.predict(images, verbose=0), before)


def test_recording_runs_inside_the_graph(functional, images):
    probed = build_keras_efficiency_model(functional, ["conv1", "conv3"])
    graph_fn = tf.function(lambda x: probed(x, training=False))
    concrete = graph_fn.get_concrete_function(tf.TensorSpec((None, 28, 28, 1), tf.float32))
    callbacks = [op for op in concrete.graph.get_operations() if op.type in ("PyFunc", "EagerPyFunc")]
    # One host callback per capture, and one where the pass begins and ends, in a traced graph.
    kinds = sorted(op.name.rsplit("/", 1)[-1] for op in callbacks)
    assert kinds == ["pass_boundary", "pass_boundary", "record_states", "record_states"]
    concrete(tf.constant(images[:10]))
    assert [c.state_count for c in probed.efficiency_layers] == [10 * 576, 10]
    probed(images[:5])  # eager call
    assert [c.state_count for c in probed.efficiency_layers] == [15 * 576, 15]
    assert all(layer.supports_jit is False for layer in probed.efficiency_layers)


def test_before_and_both(functional, images):
    probed = build_keras_efficiency_model(functional, ["conv2", "dense"], method="both")
    names = [c.name for c in probed.efficiency_layers]
    assert names == ["conv2_pre_states", "conv2_states", "dense_pre_states", "dense_states"]
    probed.predict(images, verbose=0)
    captures = {c.name: c for c in probed.efficiency_layers}
    assert _pairs(captures["conv2_pre_states"]) == _reference(_layer_values(functional, "conv2", images, before=True))
    assert captures["dense_pre_states"].n_neurons == 100
    assert captures["dense_states"].state_count == 48
    assert _pairs(captures["dense_states"]) == _reference(_layer_values(functional, "dense", images))
    assert captures["conv2_pre_states"].method == "before"


def test_branches_multiple_inputs_outputs_and_nested_model():
    keras.utils.set_random_seed(1)
    a = keras.Input((8, 8, 3), name="a")
    b = keras.Input((8, 8, 3), name="b")
    nested = keras.Sequential(
        [keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 1, name="inner_conv")], name="nested"
    )
    x = keras.layers.Conv2D(4, 3, padding="same", name="ca")(a)
    y = keras.layers.Conv2D(4, 3, padding="same", name="cb")(b)
    s = keras.layers.Add(name="add")([x, y])
    n = nested(s)
    out1 = keras.layers.GlobalAveragePooling2D(name="gap")(n)
    out2 = keras.layers.Dense(2, name="head")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model([a, b], [out1, out2], name="branchy")
    rng = np.random.default_rng(2)
    data = [rng.normal(size=(6, 8, 8, 3)).astype(np.float32) for _ in range(2)]
    expected = model.predict(data, verbose=0)

    probed = build_keras_efficiency_model(model, ["Conv2D", "nested", "add", "InputLayer"], exclude=["b"])
    names = [c.name for c in probed.efficiency_layers]
    assert names == ["a_states", "ca_states", "cb_states", "add_states", "nested_states"]
    got = probed.predict(data, verbose=0)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
    captures = {c.name: c for c in probed.efficiency_layers}
    assert captures["a_states"].state_count == 6 * 64 and captures["a_states"].n_neurons == 3
    assert _pairs(captures["ca_states"]) == _reference(_layer_values(model, "ca", data))
    assert _pairs(captures["nested_states"]) == _reference(_layer_values(model, "nested", data))
    # "before" on a multi-input layer watches its first input.
    probed = build_keras_efficiency_model(model, ["add"], method="before")
    probed.predict(data, verbose=0)
    assert _pairs(probed.efficiency_layers[0]) == _reference(_layer_values(model, "ca", data))


def test_errors(functional):
    with pytest.raises(ProbeMatchError) as info:
        build_keras_efficiency_model(functional, ["Conv3D", "missing"])
    message = str(info.value)
    assert "conv1 (Conv2D)" in message and "BatchNormalization" in message and "Conv3D" in message
    with pytest.raises(ProbeMatchError, match="excluded"):
        build_keras_efficiency_model(functional, ["Conv2D"], exclude=["conv*"])
    with pytest.raises(ValueError, match="method"):
        build_keras_efficiency_model(functional, ["Conv2D"], method="inside")
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="build"):
        build_keras_efficiency_model(unbuilt, ["Dense"])

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="subclassed"):
        build_keras_efficiency_model(sub, ["Dense"])
    with pytest.raises(TypeError, match="keras.Model"):
        build_keras_efficiency_model(object(), ["Dense"])


def test_storage_path_and_existing_store(functional, images, tmp_path):
    root = tmp_path / "states"
    probed = build_keras_efficiency_model(functional, ["conv1", "conv3"], storage_path=root)
    probed.predict(images, verbose=0)
    capture = probed.efficiency_layers[0]
    capture.flush()
    assert capture.disk_path == root / "conv1_states"
    stored = StateStore.open(root / "conv1_states")
    assert stored.array.shape == (48 * 576, 3)
    with pytest.raises(StorageExistsError):
        build_keras_efficiency_model(functional, ["conv1"], storage_path=root)
    (root / "notes.txt").write_text("mine")
    again = build_keras_efficiency_model(functional, ["conv1"], storage_path=root, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["conv1_states", "conv3_states", "notes.txt"]
    again.predict(images[:4], verbose=0)
    assert again.efficiency_layers[0].state_count == 4 * 576
    again.efficiency_layers[0].flush()
    # The earlier run's conv3 store is gone once conv1 wrote; the notes stay.
    assert sorted(p.name for p in root.iterdir()) == ["conv1_states", "notes.txt"]
    assert len(StateStore.open(root / "conv1_states").read()) == 4 * 576


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy, images):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(3)
        model = lenet5()
    finally:
        keras.config.set_dtype_policy(previous)
    probed = build_keras_efficiency_model(model, ["conv1", "conv2"])
    probed.predict(images, verbose=0)
    # One reference model fetching both layers, so that TensorFlow fuses the same
    # ops as in the probed model (fusions change float16 rounding).
    outputs = [model.get_layer(name).output for name in ("conv1", "conv2")]
    reference = keras.Model(model.inputs, outputs).predict(images, verbose=0)
    for capture, values in zip(probed.efficiency_layers, reference, strict=True):
        assert str(values.dtype) in ("float16", "bfloat16")
        assert _pairs(capture) == _reference(values.astype(np.float32))


def test_evaluate_compile_config_and_api(functional, images):
    labels = np.zeros(len(images), dtype=np.int64)
    functional.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    try:
        probed = build_efficiency_model(functional, ["Conv2D"])
        assert probed.compiled and not probed.jit_compile  # XLA cannot run host callbacks
        probed.evaluate(images, labels, batch_size=16, verbose=0)
        assert [c.state_count for c in probed.efficiency_layers] == [48 * 576, 48 * 64, 48]
        assert 0 < network_efficiency(probed) <= 1
        reset_efficiency_model(probed)
        assert [c.state_count for c in probed.efficiency_layers] == [0, 0, 0]
    finally:
        functional.compiled = False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_state_capture_dtypes(dtype):
    x = np.random.default_rng(5).normal(size=(4, 3, 3, 10)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    layer = StateCapture(f"probe_{dtype}")
    tensor = tf.cast(tf.constant(x), dtype)
    layer(tensor)  # eager
    graph_layer = StateCapture(f"graph_{dtype}")
    tf.function(lambda t: graph_layer(t))(tensor)  # graph
    expected = _reference(tf.cast(tensor, tf.float32).numpy())
    assert _pairs(layer) == expected
    assert _pairs(graph_layer) == expected


def test_state_capture_layer_standalone():
    layer = StateCapture("probe", keep_states=False)
    x = np.random.default_rng(4).normal(size=(3, 5, 7)).astype(np.float32)
    out = layer(x)
    np.testing.assert_array_equal(np.asarray(out), x)
    assert layer.state_count == 15 and layer.n_neurons == 7
    assert _pairs(layer) == _reference(x)
    clone = StateCapture.from_config(layer.get_config())
    assert clone.name == "probe" and clone.state_count == 0 and clone.channel_axis == -1


# --------------------------------------------------------------------------- neuron axes


def _numpy_counts(x, axis):
    """An independent count: ``x > 0`` moved channels-last, bit-packed, unique rows."""
    x = np.asarray(x)
    last = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    rows, counts = np.unique(np.packbits(last > 0, axis=-1, bitorder="little"), axis=0, return_counts=True)
    return sorted(zip((row.tobytes() for row in rows), counts.tolist(), strict=True))


@pytest.fixture(scope="module")
def sequence_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4, 6), name="seq")
    hidden = keras.layers.Dense(5, activation="relu", name="dense1")(inputs)
    outputs = keras.layers.Dense(3, name="dense2")(keras.layers.Flatten(name="flat")(hidden))
    return keras.Model(inputs, outputs)


def test_channel_axes_override_on_keras_layers(sequence_model):
    x = np.random.default_rng(2).normal(size=(10, 4, 6)).astype(np.float32)
    probed = build_efficiency_model(
        sequence_model, ["dense1", "dense2"], method="both", channel_axes={"dense1:after": 1, "dense2": 0}
    )
    probed.predict(x, verbose=0)
    axes = {c.name: (c.channel_axis, c.n_neurons, c.state_count) for c in probed.efficiency_layers}
    assert axes == {
        "dense1_pre_states": (2, 6, 40), "dense1_states": (1, 4, 50),
        "dense2_pre_states": (0, 10, 20), "dense2_states": (0, 10, 3),
    }  # fmt: skip
    hidden = _layer_values(sequence_model, "dense1", x)
    assert _pairs(probed.efficiency_layers[1]) == _numpy_counts(hidden, 1)


def test_channel_axes_errors_on_keras(sequence_model):
    from tensorstate_onnx import ChannelAxisError
    from tensorstate_onnx.errors import OptionTypeError

    with pytest.raises(ChannelAxisError, match=r"name no probe.*dense1_states"):
        build_efficiency_model(sequence_model, ["dense1"], channel_axes={"dense3": 1})
    with pytest.raises(ChannelAxisError, match=r"-3 to 2"):
        build_efficiency_model(sequence_model, ["dense1"], channel_axes={"dense1": 3})
    with pytest.raises(OptionTypeError, match="int"):
        build_efficiency_model(sequence_model, ["dense1"], channel_axes={"dense1": 1.5})


def test_keras_integer_inputs_are_refused():
    from tensorstate_onnx import ProbeDtypeError

    inputs = keras.Input((5,), dtype="int32", name="ids")
    embedded = keras.layers.Embedding(11, 4, name="emb")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(embedded))
    with pytest.raises(ProbeDtypeError, match=r"'emb:before'.*int32.*float"):
        build_efficiency_model(model, ["emb"], method="before")
    probed = build_efficiency_model(model, ["emb"])
    probed.predict(np.random.default_rng(3).integers(0, 11, size=(6, 5)), verbose=0)
    capture = probed.efficiency_layers[0]
    assert (capture.channel_axis, capture.n_neurons, capture.state_count) == (2, 4, 30)


# --------------------------------------------------------------------------- failed passes


@pytest.fixture(scope="module")
def explode():
    """A layer that raises (tf.debugging.assert_less) on a batch holding a value of 1e4 or more."""

    class Explode(keras.layers.Layer):
        def call(self, x):
            check = tf.debugging.assert_less(tf.reduce_max(tf.abs(x)), 1e4, message="a marked batch")
            with tf.control_dependencies([] if check is None else [check]):  # None when eager: it raised
                return tf.identity(x)

    return Explode


@pytest.fixture
def raising_model(explode):
    """Two outputs; the layer after the first probe (d1) raises on a marked batch, the
    other head (d3) does not depend on it."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    hidden = keras.layers.Dense(6, kernel_initializer="ones", name="d1")(x)
    out1 = keras.layers.Dense(4, name="d2")(explode(name="explode")(hidden))
    out2 = keras.layers.Dense(3, name="d3")(hidden)
    return keras.Model(x, [out1, out2], name="two_heads")


@pytest.fixture(scope="module")
def marked_batches():
    """Three good batches of 4 samples, and a marked one (every d1 output is 8e6)."""
    rng = np.random.default_rng(7)
    good = [rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3)]
    return good, np.full((4, 8), 1e6, np.float32)


def _assert_same_states(probed, reference):
    """Every probe of ``probed`` holds exactly the states of the same probe of ``reference``."""
    names = [c.name for c in probed.efficiency_layers]
    assert names == [c.name for c in reference.efficiency_layers]
    assert sorted(names) == ["d1_states", "d2_states", "d3_states"]
    for capture, expected in zip(probed.efficiency_layers, reference.efficiency_layers, strict=True):
        assert capture.state_count == expected.state_count
        assert _pairs(capture) == _pairs(expected)


@pytest.mark.parametrize("mode", ["predict", "eager"])
def test_a_pass_that_raises_is_dropped(mode, raising_model, marked_batches):
    good, bad = marked_batches
    probed = build_keras_efficiency_model(raising_model, ["Dense"])
    run = (lambda x: probed.predict(x, verbose=0)) if mode == "predict" else probed
    run(good[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="a marked batch"):
        run(bad)
    # d1_states saw the marked batch, but nothing of that pass is counted.
    assert [c.state_count for c in probed.efficiency_layers] == [4, 4, 4]
    with pytest.warns(RuntimeWarning, match=r"1 of its 3 probe\(s\) \(d1_states\) had recorded"):
        run(good[1])
    run(good[2])
    reference = build_keras_efficiency_model(raising_model, ["Dense"])
    reference.predict(np.concatenate(good), batch_size=4, verbose=0)
    _assert_same_states(probed, reference)
    assert probed.output_names == ["d2", "d3"]  # the given model's, not the PassEnd's


def test_a_pass_that_raises_is_dropped_in_a_sequential_model(explode, marked_batches):
    good, bad = marked_batches
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(6, kernel_initializer="ones", name="d1"), explode(name="explode"),
        keras.layers.Dense(4, name="d2"),
    ])  # fmt: skip
    probed = build_keras_efficiency_model(model, ["Dense"])
    assert type(probed) is keras.Sequential
    probed.predict(good[0], verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError):
        probed.predict(bad, verbose=0)
    assert [c.state_count for c in probed.efficiency_layers] == [4, 4]
    with pytest.warns(RuntimeWarning, match=r"1 of its 2 probe\(s\) \(d1_states\)"):
        probed(good[1])
    assert [c.state_count for c in probed.efficiency_layers] == [8, 8]


def test_probing_an_efficiency_model_keeps_one_guard(raising_model, marked_batches):
    good, bad = marked_batches
    inner = build_keras_efficiency_model(raising_model, ["d1", "d2"])
    outer = build_keras_efficiency_model(inner, ["d3"])
    names = [layer.name for layer in outer.layers]
    assert names.count("tensorstate_pass_begin") == names.count("tensorstate_pass_end") == 1
    captures = [*inner.efficiency_layers, *outer.efficiency_layers]  # the inner ones are in both
    outer.predict(good[0], verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError):
        outer.predict(bad, verbose=0)
    with pytest.warns(RuntimeWarning, match="dropped"):
        outer.predict(good[1], verbose=0)
    assert [c.state_count for c in captures] == [8, 8, 8]
    inner.predict(good[2], verbose=0)  # the inner model keeps its own guard
    assert [c.state_count for c in captures] == [12, 12, 8]


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_predict_stopped_by_a_marked_batch(steps_per_execution, raising_model, marked_batches):
    good, bad = marked_batches
    probed = build_keras_efficiency_model(raising_model, ["Dense"])
    # With 3 steps per execution the marked batch fails the graph that ran the two before it.
    probed.compile(steps_per_execution=steps_per_execution)
    with pytest.raises(tf.errors.InvalidArgumentError):
        probed.predict(np.concatenate([good[0], good[1], bad, good[2]]), batch_size=4, verbose=0)
    reference = build_keras_efficiency_model(raising_model, ["Dense"])
    reference.predict(np.concatenate(good[:2]), batch_size=4, verbose=0)
    _assert_same_states(probed, reference)
    # A reset forgets the unfinished pass too: the next pass has nothing to drop.
    reset_efficiency_model(probed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probed.predict(good[2], verbose=0)
    assert [c.state_count for c in probed.efficiency_layers] == [4, 4, 4]


def test_fit_stopped_by_a_marked_batch(raising_model, marked_batches):
    good, bad = marked_batches
    probed = build_keras_efficiency_model(raising_model, ["Dense"])
    probed.compile(optimizer="sgd", loss="mse", steps_per_execution=2)  # a tf.while_loop of steps
    x = np.concatenate([good[0], good[1], bad, good[2]])
    with pytest.raises(tf.errors.InvalidArgumentError):
        probed.fit(x, [np.zeros((16, 4)), np.zeros((16, 3))], batch_size=4, shuffle=False, verbose=0)
    assert [c.state_count for c in probed.efficiency_layers] == [8, 8, 8]


def test_a_saved_efficiency_model_keeps_the_guard(raising_model, marked_batches, explode, tmp_path):
    good, bad = marked_batches
    probed = build_keras_efficiency_model(raising_model, ["Dense"])
    probed.save(tmp_path / "probed.keras")
    loaded = keras.models.load_model(tmp_path / "probed.keras", custom_objects={"Explode": explode})
    captures = [layer for layer in loaded.layers if isinstance(layer, StateCapture)]
    assert sorted(c.name for c in captures) == ["d1_states", "d2_states", "d3_states"]
    for got, expected in zip(loaded.predict(good[0], verbose=0), probed.predict(good[0], verbose=0), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.predict(bad, verbose=0)
    with pytest.warns(RuntimeWarning, match="dropped"):
        loaded(good[1])
    assert [c.state_count for c in captures] == [8, 8, 8]


def test_a_state_capture_alone_records_at_once(explode, marked_batches):
    good, bad = marked_batches
    capture = StateCapture("alone")
    x = keras.Input((8,))
    model = keras.Model(x, explode()(capture(x)))
    model(good[0])
    with pytest.raises(tf.errors.InvalidArgumentError):
        model(bad)
    assert capture.state_count == 8  # no pass boundary: the batch counts as soon as it is seen


_TORCH_BACKEND_RUN = """
import warnings
import numpy as np, keras
from tensorstate_onnx.keras_capture import build_keras_efficiency_model

class Explode(keras.layers.Layer):
    def call(self, x):
        if float(keras.ops.convert_to_numpy(keras.ops.max(keras.ops.abs(x)))) >= 1e4:
            raise ValueError("a marked batch")
        return x

assert keras.backend.backend() == "torch"
keras.utils.set_random_seed(0)
x = keras.Input((8,), name="x")
hidden = keras.layers.Dense(6, kernel_initializer="ones", name="d1")(x)
model = keras.Model(x, [keras.layers.Dense(4, name="d2")(Explode()(hidden)), keras.layers.Dense(3, name="d3")(hidden)])
rng = np.random.default_rng(7)
good, bad = rng.normal(size=(4, 8)).astype(np.float32), np.full((4, 8), 1e6, np.float32)
for mode in ("predict", "call"):
    probed = build_keras_efficiency_model(model, ["Dense"])
    run = (lambda b: probed.predict(b, verbose=0)) if mode == "predict" else probed
    run(good)
    try:
        run(bad)
        raise SystemExit("the marked batch did not raise")
    except ValueError:
        pass
    failed = [c.state_count for c in probed.efficiency_layers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(good)
    warned = sum("did not finish" in str(w.message) for w in caught)
    print(mode, failed, [c.state_count for c in probed.efficiency_layers], warned)
"""


@pytest.mark.slow
def test_a_pass_that_raises_is_dropped_on_the_torch_backend(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    script = tmp_path / "run.py"
    script.write_text(_TORCH_BACKEND_RUN)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("predict", "call"))]
    assert lines == ["predict [4, 4, 4] [8, 8, 8] 1", "call [4, 4, 4] [8, 8, 8] 1"]


def _reference_counts(tensor: np.ndarray, axis: int) -> list[int]:
    rows = np.moveaxis(tensor > 0, axis, -1).reshape(-1, tensor.shape[axis])
    return sorted(np.unique(np.packbits(rows, axis=1, bitorder="little"), axis=0, return_counts=True)[1].tolist())


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_layers_after_a_channels_first_layer_take_its_axis(kind):
    # Elementwise layers inherit the axis they read, batch normalization has its own:
    # the ReLU and BatchNormalization after an NCHW conv have its 5 channels as neurons
    # (they took the image width, 4 positions, before).
    keras.utils.set_random_seed(4)
    layers = [
        keras.layers.Conv2D(5, 3, data_format="channels_first", name="conv"),
        keras.layers.ReLU(name="relu"),
        keras.layers.BatchNormalization(axis=1, name="bn"),
        keras.layers.Dense(3, name="dense"),  # reads [N, 5, 4, 4] as 4 features
    ]
    if kind == "sequential":
        model = keras.Sequential([keras.Input((3, 6, 6)), *layers])
    else:
        inputs = keras.Input((3, 6, 6))
        tensor = inputs
        for layer in layers:
            tensor = layer(tensor)
        model = keras.Model(inputs, tensor)
    x = np.random.default_rng(4).normal(size=(8, 3, 6, 6)).astype("float32")
    probed = build_keras_efficiency_model(model, ["conv", "relu", "bn", "dense"], method="both")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probed.predict(x, verbose=0)
    axes = {c.name: (c.channel_axis, c.n_neurons) for c in probed.efficiency_layers}
    assert axes == {
        "conv_pre_states": (1, 3), "conv_states": (1, 5), "relu_pre_states": (1, 5), "relu_states": (1, 5),
        "bn_pre_states": (1, 5), "bn_states": (1, 5), "dense_pre_states": (1, 5), "dense_states": (3, 3),
    }  # fmt: skip
    conv = layers[0](x)
    relu = keras.ops.convert_to_numpy(layers[1](conv))
    capture = {c.name: c for c in probed.efficiency_layers}
    assert sorted(capture["relu_states"].counts().tolist()) == _reference_counts(relu, 1)


def test_a_layer_called_twice_is_one_probe_recording_both_calls():
    keras.utils.set_random_seed(5)
    shared = keras.layers.Dense(6, name="dense")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, shared(shared(inputs)))
    x = np.random.default_rng(5).normal(size=(64, 6)).astype("float32")
    probed = build_keras_efficiency_model(model, ["dense"])
    probed.predict(x, batch_size=16, verbose=0)
    (capture,) = probed.efficiency_layers
    first = keras.ops.convert_to_numpy(shared(x))
    second = keras.ops.convert_to_numpy(shared(first))
    assert capture.state_count == 128
    assert sorted(capture.counts().tolist()) == _reference_counts(np.concatenate([first, second]), 1)


def test_a_layer_called_on_tensors_with_neurons_on_different_axes_records_each_call_on_its_own_axis():
    """A shared ReLU reads a channels-first conv output (neurons on axis 1) and a
    channels-last tensor of the same shape (the last axis): each call's states are
    its own tensor's channels, as the PyTorch hooks and the ONNX path record a
    module's calls, not both on the first call's axis; ``channel_axes`` still
    puts every call on the axis it names."""
    keras.utils.set_random_seed(3)
    relu = keras.layers.ReLU(name="relu")
    inputs = keras.Input((3, 4, 4))
    channels_first = keras.layers.Conv2D(4, 1, data_format="channels_first", name="conv")(inputs)
    channels_last = keras.layers.Conv2D(4, 1, name="conv_last")(keras.layers.Permute((2, 3, 1))(inputs))
    model = keras.Model(inputs, [relu(channels_first), relu(channels_last)])
    x = np.random.default_rng(3).normal(size=(8, 3, 4, 4)).astype("float32")
    first, second = (keras.ops.convert_to_numpy(t) for t in keras.Model(inputs, [channels_first, channels_last])(x))
    for overrides, expected in (
        (None, np.concatenate([np.moveaxis(first, 1, -1), second])),
        ({"relu": -1}, np.concatenate([first, second])),
    ):
        probed = build_keras_efficiency_model(model, ["relu"], channel_axes=overrides)
        probed.predict(x, verbose=0)
        (capture,) = probed.efficiency_layers
        assert capture.state_count == 2 * 8 * 4 * 4
        assert sorted(capture.counts().tolist()) == _reference_counts(expected, -1)
