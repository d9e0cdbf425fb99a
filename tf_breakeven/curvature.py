"""Per-example curvature along a direction: `e^T H_i e` for every example.

The variance of these values over the probe set is the s^2 of the SGD
stability condition (the break-even paper's eq. 1, `tf_breakeven.stability`).
All examples are differentiated at once by forward-over-forward mode on the
vector of per-example losses: d^2/dt^2 l_i(theta + t e) = e^T H_i e.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_breakeven.functional import LossLike, ModelFunction, check_vector
from tf_breakeven.operators import (
    Kernel,
    ProbeOperator,
    cached_kernel,
    loss_key,
)

_ZERO = tf.UnconnectedGradients.ZERO


class CurvatureKernel(Kernel):
    """`tf.function`s of one model configuration (see `curvature_kernel`).

    Attributes:
        function: the model and loss as a pure function.
        losses: `(x, y, sample_weight) -> per-example losses`.
        curvature: `(direction, x, y, sample_weight) -> [B]` values
            `e^T H_i e`.
    """

    def __init__(self, function: ModelFunction, jit: bool):
        super().__init__(function)
        self.curvature = tf.function(self._curvature, jit_compile=jit)

    def _curvature(self, direction, x, y, sample_weight):
        fn = self.function
        params, state = fn.primal_parameters(), fn.read_state()
        direction = [tf.cast(d, fn.dtype) for d in direction]
        with tf.autodiff.ForwardAccumulator(params, direction) as outer:
            with tf.autodiff.ForwardAccumulator(params, direction) as inner:
                losses = fn.per_example_losses(
                    params, state, x, y, sample_weight
                )
            first = inner.jvp(losses, unconnected_gradients=_ZERO)
        return outer.jvp(first, unconnected_gradients=_ZERO)


def curvature_kernel(
    model: keras.Model,
    loss: LossLike = None,
    *,
    training: bool = True,
    include_regularization: bool = True,
    jit_compile: bool = False,
) -> CurvatureKernel:
    """The shared `CurvatureKernel` of a model configuration."""
    function = ModelFunction(
        model,
        loss,
        training=training,
        include_regularization=include_regularization,
    )
    key = (
        "curvature",
        loss_key(loss),
        bool(training),
        bool(include_regularization),
        bool(jit_compile),
    )
    return cached_kernel(
        model, key, lambda: CurvatureKernel(function, jit_compile)
    )


def probe_curvature(
    operator: ProbeOperator, direction: Sequence[Any]
) -> tf.Tensor:
    """`e^T H_i e` for every example of `operator`'s probe set, [N].

    Uses the operator's model configuration (loss, mode, regularization,
    XLA). H_i is the Hessian of example i's (weighted) loss. In training
    mode with BatchNormalization, l_i depends on the whole batch through
    its statistics, and H_i is the Hessian of that coupled l_i; in every
    case `mean_i e^T H_i e == e^T H e`. `e` is used as given (normalize it
    for the curvature along a direction).
    """
    function = operator.function
    kernel = curvature_kernel(
        function.model,
        function.loss,
        training=function.training,
        include_regularization=function.include_regularization,
        jit_compile=operator.jit_compile,
    )
    direction = check_vector(direction, operator.shapes, operator.dtype)
    return tf.concat(
        [kernel.curvature(direction, *b) for b in operator.batches], axis=0
    )


def directional_curvature(
    model: keras.Model,
    data: Any,
    direction: Sequence[Any],
    *,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    jit_compile: bool = False,
) -> tf.Tensor:
    """Per-example curvature `e^T H_i e` along `direction` for every example.

    See `probe_curvature`. Its variance over examples is the s^2 of the SGD
    stability condition (break-even paper, eq. 1).

    Args:
        model: a built Keras model.
        data: `(x, y[, sample_weight])` or a finite `tf.data.Dataset` of such
            batches.
        direction: tensors shaped like `model.trainable_variables`.
        loss, training, include_regularization, jit_compile: see
            `tf_breakeven.HessianOperator`.

    Returns:
        A tensor of shape [num_examples].
    """
    kernel = curvature_kernel(
        model,
        loss,
        training=training,
        include_regularization=include_regularization,
        jit_compile=jit_compile,
    )
    operator = ProbeOperator(
        kernel.function, data, kernel.losses, jit_compile=jit_compile
    )
    return probe_curvature(operator, direction)
