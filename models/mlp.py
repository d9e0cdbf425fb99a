"""Fully-connected nets of width x depth, deep linear nets included."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tf_breakeven.validation import ArgumentError, check_positive

from .base import PACKAGE, ZooModel, check_int, check_shape

INITS = ("gaussian", "he", "glorot", "orthogonal")


def kernel_initializer(init: str, scale: float = 1.0):
    """A fresh initializer; `scale` multiplies the standard deviation.

    * `gaussian`: N(0, scale^2 / fan_in) (untruncated), the fan-in scaled
      Gaussian of the gradient-confusion paper's theory.
    * `he`: He et al. 2015, truncated normal with variance 2 scale^2 / fan_in
      (Keras' `he_normal` at scale 1).
    * `glorot`: Glorot & Bengio 2010, uniform with variance
      scale^2 * 2 / (fan_in + fan_out) (Keras' default `glorot_uniform`).
    * `orthogonal`: a (semi-)orthogonal matrix times `scale` (Saxe et al.
      2014; the gain of `keras.initializers.Orthogonal`).
    """
    if init == "gaussian":
        return keras.initializers.VarianceScaling(
            scale * scale, "fan_in", "untruncated_normal"
        )
    if init == "he":
        return keras.initializers.VarianceScaling(
            2.0 * scale * scale, "fan_in", "truncated_normal"
        )
    if init == "glorot":
        return keras.initializers.VarianceScaling(
            scale * scale, "fan_avg", "uniform"
        )
    if init == "orthogonal":
        return keras.initializers.Orthogonal(gain=scale)
    raise ValueError(f"`init` must be one of {INITS}; got {init!r}.")


def check_activation(activation: str) -> str:
    """Returns `activation` if it is a Keras activation name, else raises."""
    if not isinstance(activation, str):
        raise ArgumentError(
            "`activation` must be a Keras activation name (it is stored "
            f"in the config), e.g. 'relu' or 'linear'; got {activation!r}."
        )
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ArgumentError(
            "`activation` must be a Keras activation name such as "
            f"'relu', 'tanh' or 'linear'; got {activation!r}."
        ) from error
    return activation


@keras.saving.register_keras_serializable(package=PACKAGE)
class MLP(ZooModel):
    """A fully-connected network of `depth` hidden layers of `width` units.

    Sankararaman et al., *The Impact of Neural Network Overparameterization
    on Gradient Confusion and SGD* (ICML 2020) train such networks on MNIST
    (28x28 images flattened, 10 classes) while varying width and depth
    (confusion falls with width, grows with depth), compare Gaussian (fan-in
    scaled) with orthogonal initialization in deep linear networks
    (`activation="linear"`; orthogonal initialization makes early training
    independent of depth), and add batch normalization and skip connections.

    Hidden layer l: `z = act(BN(W h + b))`; with `skip_connections=True`
    layers 2..depth are residual, `h <- h + z` (the first maps the input
    to `width` units and has no shortcut). BN, when on, comes before the
    activation. The output layer is a dense layer to `num_classes` logits
    (initialized like the hidden layers). Biases start at zero.
    Parameters: (d_in + 1) w + (depth - 1)(w + 1) w + (w + 1) c, fewer the
    biases with `use_bias=False`, plus 2 w per BN layer (and 2 w moving
    statistics).

    Args:
        num_classes: output logits.
        input_shape: input shape without batch axis; flattened if rank > 1.
        width: units per hidden layer.
        depth: number of hidden layers (>= 1).
        activation: any Keras activation name, `"linear"` for a deep linear
            network.
        init: weight initialization, one of "gaussian", "he", "glorot",
            "orthogonal" (see `kernel_initializer`).
        init_scale: multiplies the initial weights' standard deviation (the
            orthogonal gain).
        use_bias: dense layers have biases (deep linear networks in the
            literature usually have none).
        batch_norm: BatchNormalization before every hidden activation.
        skip_connections: residual hidden layers 2..depth.
        name: model name.
        **kwargs: passed to `keras.Model`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (28, 28, 1),
        width: int = 100,
        depth: int = 2,
        activation: str = "relu",
        init: str = "he",
        init_scale: float = 1.0,
        use_bias: bool = True,
        batch_norm: bool = False,
        skip_connections: bool = False,
        name: str = "mlp",
        **kwargs,
    ):
        check_activation(activation)
        kernel_initializer(init)  # validates `init`
        config = {
            "num_classes": check_int("num_classes", num_classes),
            "input_shape": check_shape("input_shape", input_shape),
            "width": check_int("width", width),
            "depth": check_int("depth", depth),
            "activation": activation,
            "init": init,
            "init_scale": check_positive("init_scale", init_scale),
            "use_bias": bool(use_bias),
            "batch_norm": bool(batch_norm),
            "skip_connections": bool(skip_connections),
        }
        inputs = keras.Input(config["input_shape"], name="inputs")
        h = inputs
        if len(config["input_shape"]) > 1:
            h = keras.layers.Flatten(name="flatten")(h)
        for layer in range(1, depth + 1):
            z = keras.layers.Dense(
                width,
                use_bias=use_bias,
                kernel_initializer=kernel_initializer(init, init_scale),
                name=f"dense{layer}",
            )(h)
            if batch_norm:
                z = keras.layers.BatchNormalization(name=f"bn{layer}")(z)
            z = keras.layers.Activation(activation, name=f"act{layer}")(z)
            if skip_connections and layer > 1:
                z = keras.layers.Add(name=f"skip{layer}")([h, z])
            h = z
        outputs = keras.layers.Dense(
            config["num_classes"],
            use_bias=use_bias,
            kernel_initializer=kernel_initializer(init, init_scale),
            name="logits",
        )(h)
        super().__init__(inputs, outputs, config=config, name=name, **kwargs)
