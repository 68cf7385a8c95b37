"""Node metadata that exporters write to name the framework layer of each ONNX node.

The PyTorch dynamo exporter stores, on every node, the qualified names of the
modules around it (:data:`TORCH_NAME_SCOPES`) and their classes
(:data:`TORCH_CLASS_HIERARCHY`), as Python list literals; ``from_torch`` writes
the same keys for legacy exports. ``from_keras`` stores the Keras layer, its
class and class path under the ``pkg.keras.*`` keys. The converters (writers)
and :mod:`~tensorstate_onnx.graph.scopes` (reader) take the keys from here, so
the two cannot drift apart. This module imports nothing.
"""

from __future__ import annotations

import ast

__all__ = [
    "KERAS_LAYER_CLASS",
    "KERAS_LAYER_CLASS_PATH",
    "KERAS_LAYER_NAME",
    "TORCH_CLASS_HIERARCHY",
    "TORCH_NAME_SCOPES",
    "parse_list",
]

#: Qualified module names from the root (``''``) down, ending with the FX node name.
TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
#: The classes of those modules (``"torch.nn.modules.conv.Conv2d"``), ending with the aten op.
TORCH_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
#: The top-level Keras layer a node was converted from.
KERAS_LAYER_NAME = "pkg.keras.layer_name"
#: That layer's class name (``"Conv2D"``).
KERAS_LAYER_CLASS = "pkg.keras.layer_class"
#: That layer's full class path (``"keras.src.layers.convolutional.conv2d.Conv2D"``).
KERAS_LAYER_CLASS_PATH = "pkg.keras.layer_class_path"


def parse_list(text: str | None) -> list[str]:
    """Parse a list-valued metadata entry such as ``"['', 'conv1', 'conv2d']"``.

    Returns the items as strings, or [] when ``text`` is empty, malformed or not a list.
    """
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, list) else []
