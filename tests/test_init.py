"""The package's top level: every public name resolves, and heavy modules load on first use."""

import subprocess
import sys

import pytest

import tensorstate_onnx as ts


@pytest.mark.parametrize("name", ts.__all__)
def test_every_public_name_resolves_to_its_module_object(name):
    value = getattr(ts, name)
    assert value.__name__ == name
    assert value.__module__.startswith("tensorstate_onnx.")
    assert name in dir(ts)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'StateCapture'"):
        ts.StateCapture  # the Keras layer lives in tensorstate_onnx.keras_capture


def test_import_loads_no_engine_storage_or_onnx_until_used():
    code = (
        "import sys, tensorstate_onnx as ts\n"
        "heavy = ('numba', 'zarr', 'onnx', 'onnxruntime', 'torch', 'tensorflow', 'keras')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
        "ts.pack\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
        "ts.OnnxEfficiencyModel\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnx', 'onnxruntime', 'zarr'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines() == ["[]", "['numba']", "['onnx', 'onnxruntime', 'zarr']"]
