"""Reference model definitions used by the demo, the tests and the benchmarks.

The same two architectures are defined for every front end so that results can be
compared across frameworks:

- :mod:`models.torch_models` — PyTorch ``LeNet5`` and
  ``MobileNetV2Small`` (channels-first; needs ``torch``).
- :mod:`models.keras_models` — Keras 3 LeNet-5 (Functional and
  Sequential) and a MobileNetV2-style network (channels-last; needs ``keras``).
- :mod:`models.onnx_models` — a MobileNetV2-style ``ModelProto``
  built with ``onnx.helper`` and random weights, so ONNX-only code paths can be
  exercised without any training framework installed.

This package imports no framework itself: import the submodule you need.
"""

from __future__ import annotations

# The MobileNetV2-style architecture shared by all three front ends, so that the
# torch, Keras and ONNX versions have the same layers and shapes.
MOBILENET_V2_SMALL_STEM: int = 32
"""Output channels of the stride-2 3x3 stem convolution."""

MOBILENET_V2_SMALL_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 8, 1),
    (6, 16, 2),
    (6, 16, 1),
    (6, 24, 2),
    (6, 24, 1),
    (6, 48, 2),
    (6, 48, 1),
)
"""``(expand_ratio, out_channels, stride)`` of each inverted residual block.

Channel counts are MobileNetV2's at width multiplier ~0.5; a 96x96 input reaches
6x6 after the four stride-2 stages. Blocks 3, 5 and 7 keep shape and so get a skip.
"""

MOBILENET_V2_SMALL_LAST: int = 320
"""Output channels of the final 1x1 convolution (1280 in the full-size network)."""
