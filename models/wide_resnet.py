"""Wide ResNet WRN-depth-width, and CNN-beta-ell (no BN, no skips)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from .base import PACKAGE, ZooModel, check_int, check_rate, check_shape
from .resnet import batch_norm


@keras.saving.register_keras_serializable(package=PACKAGE)
class WideResNet(ZooModel):
    """WRN-depth-width of Zagoruyko & Komodakis, with BN and skips switchable.

    Zagoruyko & Komodakis, *Wide Residual Networks* (BMVC 2016): a 3x3
    convolution with `base_filters` (16) filters, three stages of
    n = (depth - 4) / 6 pre-activation basic blocks
    (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the shortcut) with
    16k, 32k and 64k filters (k = `width`) on 32x32, 16x16 and 8x8 maps, the
    second and third stage starting with stride 2, then BN-ReLU, global
    average pooling and a dense layer. A shortcut is the identity, or a 1x1
    convolution of the block's pre-activated input where the shape changes
    (as in the authors' code). He normal initialization. WRN-28-10 for 10
    classes: 36,479,194 trainable parameters (the paper: 36.5M).

    Sankararaman et al., *The Impact of Neural Network Overparameterization
    on Gradient Confusion and SGD* (ICML 2020) use this family for CIFAR
    image classification to show that gradient confusion grows with depth
    and shrinks with width, and that BN together with skip connections
    reduces it in deep networks.
    With `batch_norm=False` and `skip_connections=False` it is their
    CNN-beta-ell (beta = `width`, ell = `depth`): the same stack of
    ReLU-conv3x3 layers, no normalization and no shortcut (neither identity
    nor 1x1 convolution); its convolutions then carry a bias, which a
    convolution followed by BN does not need.

    Args:
        num_classes: output logits.
        input_shape: image shape (height, width, channels).
        depth: 6n + 4 (16, 22, 28, 40, ...).
        width: the widening factor k (>= 1).
        batch_norm: BatchNormalization before every ReLU.
        skip_connections: residual shortcuts.
        dropout: dropout rate between the two convolutions of a block
            (the paper's WRN-28-10 with dropout uses 0.3).
        base_filters: filters of the first convolution; stage s has
            base_filters * 2**s * width filters.
        name: model name.
        **kwargs: passed to `keras.Model`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (32, 32, 3),
        depth: int = 28,
        width: int = 10,
        batch_norm: bool = True,
        skip_connections: bool = True,
        dropout: float = 0.0,
        base_filters: int = 16,
        name: str | None = None,
        **kwargs,
    ):
        config = {
            "num_classes": check_int("num_classes", num_classes),
            "input_shape": check_shape("input_shape", input_shape, rank=3),
            "depth": check_int("depth", depth, minimum=10),
            "width": check_int("width", width),
            "batch_norm": bool(batch_norm),
            "skip_connections": bool(skip_connections),
            "dropout": check_rate("dropout", dropout),
            "base_filters": check_int("base_filters", base_filters),
        }
        if (depth - 4) % 6:
            raise ValueError(
                f"`depth` must be 6n + 4 (16, 22, 28, 40); got {depth}."
            )
        if name is None:
            name = f"wrn_{depth}_{width}"
            if not (batch_norm and skip_connections):
                name = f"cnn_{width}_{depth}"
        blocks = (depth - 4) // 6
        builder = _Builder(config)
        inputs = keras.Input(config["input_shape"], name="image")
        x = builder.conv(base_filters, 3, 1, "stem_conv")(inputs)
        for stage in range(3):
            filters = base_filters * 2**stage * width
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = builder.block(
                    x, filters, stride, f"stage{stage + 1}_{block}"
                )
        x = builder.activate(x, "final")
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        outputs = keras.layers.Dense(config["num_classes"], name="logits")(x)
        super().__init__(inputs, outputs, config=config, name=name, **kwargs)


class _Builder:
    def __init__(self, config: dict):
        self.batch_norm = config["batch_norm"]
        self.skip = config["skip_connections"]
        self.dropout = config["dropout"]

    def conv(self, filters: int, size: int, stride: int, name: str):
        return keras.layers.Conv2D(
            filters,
            size,
            strides=stride,
            padding="same",
            use_bias=not self.batch_norm,
            kernel_initializer="he_normal",
            name=name,
        )

    def activate(self, x, name: str):
        if self.batch_norm:
            x = batch_norm(f"{name}_bn")(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x)

    def block(self, x, filters: int, stride: int, name: str):
        same_shape = stride == 1 and x.shape[-1] == filters
        y = self.activate(x, f"{name}_1")
        if self.skip:
            # The authors' code feeds the projection the pre-activated
            # input, and the identity the raw input.
            shortcut = (
                x
                if same_shape
                else self.conv(filters, 1, stride, f"{name}_shortcut")(y)
            )
        y = self.conv(filters, 3, stride, f"{name}_conv1")(y)
        y = self.activate(y, f"{name}_2")
        if self.dropout:
            y = keras.layers.Dropout(self.dropout, name=f"{name}_dropout")(y)
        y = self.conv(filters, 3, 1, f"{name}_conv2")(y)
        if self.skip:
            y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
        return y
