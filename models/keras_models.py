"""Keras 3 reference models: LeNet-5 (TensorState tutorial) and a small MobileNetV2.

Channels-last versions of :mod:`models.torch_models` with the same
layer structure. Every layer is named, so probes can be attached by layer name and
the names survive conversion to ONNX.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from models import (
    MOBILENET_V2_SMALL_BLOCKS,
    MOBILENET_V2_SMALL_LAST,
    MOBILENET_V2_SMALL_STEM,
)

__all__ = ["lenet5", "lenet5_sequential", "mobilenet_v2_small"]


def _lenet5_layers(num_classes: int) -> list[keras.layers.Layer]:
    """The LeNet-5 layers in call order, shared by the Functional and Sequential builds."""
    return [
        layers.Conv2D(20, 5, name="conv1"),
        layers.ELU(name="elu1"),
        layers.BatchNormalization(name="bn1"),
        layers.MaxPooling2D(2, name="pool1"),
        layers.Conv2D(50, 5, name="conv2"),
        layers.ELU(name="elu2"),
        layers.BatchNormalization(name="bn2"),
        layers.MaxPooling2D(2, name="pool2"),
        layers.Conv2D(100, 4, name="conv3"),
        layers.ELU(name="elu3"),
        layers.BatchNormalization(name="bn3"),
        layers.Flatten(name="flatten"),
        layers.Dense(num_classes, name="dense"),
    ]


def lenet5(num_classes: int = 10) -> keras.Model:
    """LeNet-5 as a Functional model: ``(28, 28, 1)`` images to logits.

    conv1/conv2/conv3 give 24x24x20, 8x8x50 and 1x1x100 outputs; each is followed
    by ELU then BatchNorm, the first two by 2x2 max pooling.
    """
    inputs = keras.Input(shape=(28, 28, 1), name="input")
    x = inputs
    for layer in _lenet5_layers(num_classes):
        x = layer(x)
    return keras.Model(inputs, x, name="lenet5")


def lenet5_sequential(num_classes: int = 10) -> keras.Sequential:
    """The same LeNet-5 as :func:`lenet5`, built as a ``keras.Sequential`` model.

    Useful to exercise code paths that rebuild Sequential models differently from
    Functional ones.
    """
    return keras.Sequential(
        [keras.Input(shape=(28, 28, 1), name="input"), *_lenet5_layers(num_classes)],
        name="lenet5_sequential",
    )


def _bn_relu6(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    """BatchNorm + ReLU6 after the convolution ``{name}_conv``."""
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)


def _conv_bn_relu6(
    x: keras.KerasTensor, filters: int, kernel_size: int, name: str, strides: int = 1
) -> keras.KerasTensor:
    """Conv (no bias) + BatchNorm + ReLU6, named ``{name}_conv/_bn/_relu6``."""
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    return _bn_relu6(x, name)


def _inverted_residual(
    x: keras.KerasTensor, out_ch: int, stride: int, expand_ratio: int, name: str
) -> keras.KerasTensor:
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project, optional skip."""
    in_ch = x.shape[-1]
    h = x
    if expand_ratio != 1:
        h = _conv_bn_relu6(h, in_ch * expand_ratio, 1, name=f"{name}_expand")
    h = layers.DepthwiseConv2D(
        3, strides=stride, padding="same", use_bias=False, name=f"{name}_depthwise_conv"
    )(h)
    h = _bn_relu6(h, f"{name}_depthwise")
    h = layers.Conv2D(out_ch, 1, use_bias=False, name=f"{name}_project_conv")(h)
    h = layers.BatchNormalization(name=f"{name}_project_bn")(h)
    if stride == 1 and in_ch == out_ch:
        h = layers.Add(name=f"{name}_add")([x, h])
    return h


def mobilenet_v2_small(
    num_classes: int = 10, input_shape: tuple[int, int, int] = (96, 96, 3)
) -> keras.Model:
    """A MobileNetV2-style Functional model with the layout of the torch version.

    Layers are named ``stem_*``, ``block{i}_*`` (i = 1..7, as ``features[i]`` in
    torch), ``last_*``, ``pool`` and ``classifier``. Shapes match the torch model;
    note that Keras' ``"same"`` padding of a stride-2 conv on an even-sized input
    pads bottom/right only where torch pads both sides, so ported weights would
    not reproduce torch's outputs exactly.
    """
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv_bn_relu6(inputs, MOBILENET_V2_SMALL_STEM, 3, name="stem", strides=2)
    for i, (expand, out_ch, stride) in enumerate(MOBILENET_V2_SMALL_BLOCKS, start=1):
        x = _inverted_residual(x, out_ch, stride, expand, name=f"block{i}")
    x = _conv_bn_relu6(x, MOBILENET_V2_SMALL_LAST, 1, name="last")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2_small")


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> keras.Model:
    """Give every BatchNormalization statistics and an affine map far from the identity, in place.

    The Keras twin of :func:`models.torch_models.randomize_batchnorm`.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(size=beta.shape),
                rng.normal(size=mean.shape) * 0.1, rng.uniform(0.5, 2.0, var.shape),
            ])  # fmt: skip
    return model
