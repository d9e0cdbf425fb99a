"""CIFAR ResNet (He et al. 2016, section 4.2): ResNet-20/32/44/56/110."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from .base import PACKAGE, ZooModel, check_int, check_shape

# PyTorch / Torch defaults of the original CIFAR ResNet implementations
# (Keras' defaults are momentum 0.99, epsilon 1e-3).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package=PACKAGE)
class ZeroPadShortcut(keras.layers.Layer):
    """He et al.'s option-A shortcut: subsample, then zero-pad channels.

    Parameter-free. Takes every `stride`-th pixel and pads the channel axis
    with zeros up to `filters` (split evenly before and after, as in the
    common CIFAR implementations).
    """

    def __init__(self, filters: int, stride: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_int("filters", filters)
        self.stride = check_int("stride", stride)

    def call(self, x):
        x = x[:, :: self.stride, :: self.stride, :]
        extra = self.filters - x.shape[-1]
        if extra < 0:
            raise ValueError(
                f"ZeroPadShortcut cannot shrink {x.shape[-1]} channels to "
                f"{self.filters}."
            )
        before = extra // 2
        return keras.ops.pad(
            x, [[0, 0], [0, 0], [0, 0], [before, extra - before]]
        )

    def compute_output_shape(self, input_shape):
        def subsampled(d):
            return None if d is None else -(-d // self.stride)

        batch, height, width, _ = input_shape
        return (batch, subsampled(height), subsampled(width), self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "stride": self.stride,
        }


def batch_norm(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )


def conv3x3(filters: int, stride: int, name: str, use_bias: bool = False):
    return keras.layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        name=name,
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class CifarResNet(ZooModel):
    """The CIFAR-10 ResNet of He et al., depth 6n + 2 (ResNet-32: n = 5).

    He, Zhang, Ren, Sun, *Deep Residual Learning for Image Recognition*
    (CVPR 2016), section 4.2: a 3x3 convolution with 16 filters, three
    stages of n basic blocks (two 3x3 convolutions, each followed by
    BatchNormalization; ReLU after the first and after the addition) with
    16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps, global average
    pooling and a dense layer. Option-A shortcuts: identity, and where the
    shape changes, subsampling with zero-padded channels (no parameters).
    He normal initialization, convolutions without bias.

    Jastrzebski et al. (ICLR 2020, the break-even paper) train ResNet-32 on
    CIFAR-10 (10 classes): 464,154 trainable parameters here, He et al.
    report 0.46M (plus 2,272 BatchNormalization moving statistics, which
    Keras' `count_params()` includes).

    Args:
        num_classes: output logits.
        input_shape: image shape (height, width, channels).
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        base_filters: filters of the first stage (16); stage s has
            base_filters * 2**s.
        name: model name.
        **kwargs: passed to `keras.Model`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (32, 32, 3),
        depth: int = 32,
        base_filters: int = 16,
        name: str = "resnet32",
        **kwargs,
    ):
        config = {
            "num_classes": check_int("num_classes", num_classes),
            "input_shape": check_shape("input_shape", input_shape, rank=3),
            "depth": check_int("depth", depth, minimum=8),
            "base_filters": check_int("base_filters", base_filters),
        }
        if (depth - 2) % 6:
            raise ValueError(
                f"`depth` must be 6n + 2 (20, 32, 44, 56, 110); got {depth}."
            )
        blocks = (depth - 2) // 6
        inputs = keras.Input(config["input_shape"], name="image")
        x = conv3x3(base_filters, 1, "stem_conv")(inputs)
        x = batch_norm("stem_bn")(x)
        x = keras.layers.ReLU(name="stem_relu")(x)
        for stage in range(3):
            filters = base_filters * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _basic_block(
                    x, filters, stride, f"stage{stage + 1}_{block}"
                )
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        outputs = keras.layers.Dense(
            config["num_classes"], kernel_initializer="he_normal", name="logits"
        )(x)
        super().__init__(inputs, outputs, config=config, name=name, **kwargs)


def _basic_block(x, filters: int, stride: int, name: str):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = ZeroPadShortcut(filters, stride, name=f"{name}_shortcut")(x)
    y = conv3x3(filters, stride, f"{name}_conv1")(x)
    y = batch_norm(f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv3x3(filters, 1, f"{name}_conv2")(y)
    y = batch_norm(f"{name}_bn2")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_relu2")(y)
