"""DenseNet (Huang et al. 2017): DenseNet-121 and the CIFAR DenseNet-BC."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tf_breakeven.validation import check_choice, check_fraction

from .base import (
    PACKAGE,
    ZooModel,
    check_int,
    check_ints,
    check_shape,
)

STEMS = ("imagenet", "cifar")
# keras.applications' value (it keeps Caffe's weights loadable).
BN_EPSILON = 1.001e-5


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


def _conv(filters: int, size: int, name: str, **kwargs) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(
        filters, size, use_bias=False, name=name, **kwargs
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class DenseNet(ZooModel):
    """DenseNet: dense blocks of BN-ReLU-conv layers joined by transitions.

    Huang, Liu, van der Maaten, Weinberger, *Densely Connected Convolutional
    Networks* (CVPR 2017). Every layer of a dense block sees the
    concatenation of all earlier feature maps and adds `growth_rate` (k)
    maps: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k) with `bottleneck=True` (the
    "B"), BN-ReLU-conv3x3(k) without. A transition between blocks is
    BN-ReLU-conv1x1(compression * channels)-avgpool2 (compression 0.5 is the
    "C"). The head is BN-ReLU, global average pooling and a dense layer.

    * `stem="imagenet"`: conv7x7/2 with 2k filters, BN, ReLU, maxpool3x3/2;
      with the defaults (blocks 6-12-24-16, k = 32) this is DenseNet-121,
      layer for layer the network of `keras.applications.DenseNet121`
      (7,978,856 trainable parameters for 1,000 classes plus 83,648
      moving statistics = 8,062,504; published: 8.0M). Jastrzebski et al.
      (ICLR 2020, the break-even paper) train DenseNet-121 on ImageNet
      (224x224x3, 1,000 classes).
    * `stem="cifar"`: a single conv3x3 with 2k filters, for 32x32 images;
      `densenet_bc(depth, growth_rate)` gives DenseNet-BC-depth-k, e.g.
      DenseNet-BC-100-12 (769,162 trainable parameters for 10 classes;
      published: 0.8M).

    Convolutions have no bias; initialization is Keras' default
    (glorot_uniform), as in `keras.applications`.

    Args:
        num_classes: output logits.
        input_shape: image shape (height, width, channels).
        blocks: layers per dense block.
        growth_rate: k, feature maps added per layer.
        compression: fraction of channels a transition keeps (0, 1].
        bottleneck: 1x1 bottleneck convolution (4k maps) in every layer.
        stem: "imagenet" or "cifar" (see above).
        init_filters: filters of the stem convolution; None for 2k.
        name: model name; None for "densenet121" on the default
            configuration, else "densenet".
        **kwargs: passed to `keras.Model`.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        input_shape: Sequence[int] = (224, 224, 3),
        blocks: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        compression: float = 0.5,
        bottleneck: bool = True,
        stem: str = "imagenet",
        init_filters: int | None = None,
        name: str | None = None,
        **kwargs,
    ):
        check_choice("stem", stem, STEMS)
        config = {
            "num_classes": check_int("num_classes", num_classes),
            "input_shape": check_shape("input_shape", input_shape, rank=3),
            "blocks": check_ints("blocks", blocks),
            "growth_rate": check_int("growth_rate", growth_rate),
            "compression": check_fraction("compression", compression),
            "bottleneck": bool(bottleneck),
            "stem": stem,
            "init_filters": (
                None
                if init_filters is None
                else check_int("init_filters", init_filters)
            ),
        }
        if name is None:
            name = "densenet121" if _is_densenet121(config) else "densenet"
        inputs = keras.Input(config["input_shape"], name="image")
        x = _stem(inputs, config["init_filters"] or 2 * growth_rate, stem)
        for i, layers in enumerate(config["blocks"], start=1):
            for j in range(1, layers + 1):
                x = _dense_layer(x, growth_rate, bottleneck, f"conv{i + 1}_{j}")
            if i < len(config["blocks"]):
                x = _transition(x, compression, f"pool{i + 1}")
        x = _bn("bn")(x)
        x = keras.layers.ReLU(name="relu")(x)
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        outputs = keras.layers.Dense(config["num_classes"], name="logits")(x)
        super().__init__(inputs, outputs, config=config, name=name, **kwargs)


def _is_densenet121(config: dict) -> bool:
    return (
        config["blocks"] == (6, 12, 24, 16)
        and config["growth_rate"] == 32
        and config["stem"] == "imagenet"
        and config["bottleneck"]
        and config["compression"] == 0.5
        and config["init_filters"] in (None, 64)
    )


def _stem(x, filters: int, stem: str):
    if stem == "cifar":
        return _conv(filters, 3, "conv1_conv", padding="same")(x)
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = _conv(filters, 7, "conv1_conv", strides=2)(x)
    x = _bn("conv1_bn")(x)
    x = keras.layers.ReLU(name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)


def _dense_layer(x, growth_rate: int, bottleneck: bool, name: str):
    y = x
    if bottleneck:
        y = _bn(f"{name}_0_bn")(y)
        y = keras.layers.ReLU(name=f"{name}_0_relu")(y)
        y = _conv(4 * growth_rate, 1, f"{name}_1_conv")(y)
    y = _bn(f"{name}_1_bn")(y)
    y = keras.layers.ReLU(name=f"{name}_1_relu")(y)
    y = _conv(growth_rate, 3, f"{name}_2_conv", padding="same")(y)
    return keras.layers.Concatenate(name=f"{name}_concat")([x, y])


def _transition(x, compression: float, name: str):
    x = _bn(f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = _conv(int(x.shape[-1] * compression), 1, f"{name}_conv")(x)
    return keras.layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def densenet_bc(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    init_filters: int | None = None,
    name: str = "densenet_bc",
    **kwargs,
) -> DenseNet:
    """DenseNet-BC-depth-k for CIFAR (Huang et al. 2017, section 4).

    Three dense blocks of (depth - 4) / 6 bottleneck layers, compression
    0.5, a conv3x3 stem of 2k filters: DenseNet-BC-100-12 (0.8M parameters)
    by default; 250-24 and 190-40 are the paper's larger ones.

    Args:
        num_classes: output logits.
        input_shape: image shape (height, width, channels).
        depth: 6n + 4 (the paper's L: two convolutions per layer, the stem,
            two transitions and the classifier).
        growth_rate: k.
        compression: fraction of channels a transition keeps.
        init_filters: stem filters; None for 2k.
        name: model name.
        **kwargs: passed to `keras.Model`.

    Returns:
        A `DenseNet` (its config stores `blocks`, not `depth`).
    """
    depth = check_int("depth", depth, minimum=10)
    if (depth - 4) % 6:
        raise ValueError(
            f"DenseNet-BC `depth` must be 6n + 4 (40, 100, 190, 250); got "
            f"{depth}."
        )
    return DenseNet(
        num_classes=num_classes,
        input_shape=input_shape,
        blocks=((depth - 4) // 6,) * 3,
        growth_rate=growth_rate,
        compression=compression,
        stem="cifar",
        init_filters=init_filters,
        name=name,
        **kwargs,
    )
