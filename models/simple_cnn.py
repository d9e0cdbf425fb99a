"""SimpleCNN: the Keras CIFAR-10 example network (and SimpleCNN-BN)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from .base import (
    PACKAGE,
    ZooModel,
    check_int,
    check_ints,
    check_rate,
    check_shape,
)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SimpleCNN(ZooModel):
    """The small CIFAR-10 convnet of the Keras examples (`cifar10_cnn.py`).

    Jastrzebski et al., *The Break-Even Point on Optimization Trajectories of
    Deep Neural Networks* (ICLR 2020) call it SimpleCNN and train it on
    CIFAR-10 (32x32x3, 10 classes) with plain SGD, measuring the top
    eigenvalues of H and K along the trajectory; SimpleCNN-BN (a
    BatchNormalization layer after every convolution) is the network of
    their batch-normalization experiments.

    Architecture (defaults = the Keras example, 1,250,858 parameters)::

        conv3x3(32, same)-relu  conv3x3(32, valid)-relu  maxpool2  dropout .25
        conv3x3(64, same)-relu  conv3x3(64, valid)-relu  maxpool2  dropout .25
        flatten  dense(512)-relu  dropout .5  dense(num_classes)

    The output is logits (the example ends in a softmax; here the loss takes
    `from_logits=True`, which is the same function, numerically safer). With
    `batch_norm=True` each convolution is followed by BatchNormalization
    before its ReLU and drops its bias (redundant before BN): 1,251,050
    parameters + 384 moving statistics.

    Args:
        num_classes: output logits.
        input_shape: image shape (height, width, channels).
        batch_norm: BatchNormalization after every convolution (SimpleCNN-BN).
        filters: filters of the two convolution pairs.
        dense_units: width of the hidden dense layer.
        conv_dropout: dropout rate after each pooling layer.
        dense_dropout: dropout rate after the hidden dense layer.
        name: model name.
        **kwargs: passed to `keras.Model` (e.g. `trainable`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (32, 32, 3),
        batch_norm: bool = False,
        filters: Sequence[int] = (32, 64),
        dense_units: int = 512,
        conv_dropout: float = 0.25,
        dense_dropout: float = 0.5,
        name: str = "simple_cnn",
        **kwargs,
    ):
        config = {
            "num_classes": check_int("num_classes", num_classes),
            "input_shape": check_shape("input_shape", input_shape, rank=3),
            "batch_norm": bool(batch_norm),
            "filters": check_ints("filters", filters),
            "dense_units": check_int("dense_units", dense_units),
            "conv_dropout": check_rate("conv_dropout", conv_dropout),
            "dense_dropout": check_rate("dense_dropout", dense_dropout),
        }
        size = config["input_shape"][0]
        for _ in config["filters"]:
            size = (size - 2) // 2
        if size < 1:
            raise ValueError(
                f"`input_shape={input_shape}` is too small for "
                f"{len(config['filters'])} conv-conv-pool stages (each takes "
                "(size - 2) // 2); use at least 10x10 for two stages."
            )
        inputs = keras.Input(config["input_shape"], name="image")
        x = inputs
        for stage, width in enumerate(config["filters"], start=1):
            for i, padding in enumerate(("same", "valid"), start=1):
                x = keras.layers.Conv2D(
                    width,
                    3,
                    padding=padding,
                    use_bias=not batch_norm,
                    name=f"conv{stage}_{i}",
                )(x)
                if batch_norm:
                    x = keras.layers.BatchNormalization(
                        name=f"conv{stage}_{i}_bn"
                    )(x)
                x = keras.layers.ReLU(name=f"conv{stage}_{i}_relu")(x)
            x = keras.layers.MaxPooling2D(2, name=f"pool{stage}")(x)
            x = keras.layers.Dropout(
                config["conv_dropout"], name=f"pool{stage}_dropout"
            )(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(
            config["dense_units"], activation="relu", name="dense"
        )(x)
        x = keras.layers.Dropout(config["dense_dropout"], name="dense_dropout")(
            x
        )
        outputs = keras.layers.Dense(config["num_classes"], name="logits")(x)
        super().__init__(inputs, outputs, config=config, name=name, **kwargs)
