"""Tests of tensorstate_onnx.graph.metadata: the keys exporters write and how list values parse."""

from tensorstate_onnx.graph import metadata


def test_keys_are_the_ones_exporters_write():
    """The PyTorch dynamo exporter's keys, and from_keras's, as they stand in .onnx files."""
    assert metadata.TORCH_NAME_SCOPES == "pkg.torch.onnx.name_scopes"
    assert metadata.TORCH_CLASS_HIERARCHY == "pkg.torch.onnx.class_hierarchy"
    assert metadata.KERAS_LAYER_NAME == "pkg.keras.layer_name"
    assert metadata.KERAS_LAYER_CLASS == "pkg.keras.layer_class"
    assert metadata.KERAS_LAYER_CLASS_PATH == "pkg.keras.layer_class_path"


def test_parse_list():
    assert metadata.parse_list("['', 'features', 'features.0', 'conv2d']") == ["", "features", "features.0", "conv2d"]
    assert metadata.parse_list("[1, 'a']") == ["1", "a"]
    for malformed in (None, "", "['unclosed'", "'not a list'", "{'a': 1}", "os.system('x')"):
        assert metadata.parse_list(malformed) == [], malformed
