"""Hessian of the probe-set loss of a Keras model, matrix-free.

`HessianOperator` turns a model, a loss and a probe set into the operator
`v -> H v`, where H is the Hessian of the mean loss over all probe examples
with respect to the trainable variables (see `functional` for what "the
loss" means). The solvers of `linalg` then give its top/bottom eigenpairs,
trace and spectral density.

How the Hessian-vector product is computed (`method`):

* `"backward_over_backward"` (what `method="auto"` picks): the gradient of
  `<grad, v>`, double reverse mode. On every zoo model it traces 1.4-3.5x
  faster than forward-over-backward (DenseNet-BC-40-12: 9 s against 33 s)
  and runs within 15% of it, usually faster (BENCHMARKS.md section 8), and
  it is the only one that works through a rolled recurrent layer (a Keras
  RNN with `unroll=False`: forward mode through the backward pass of a
  `tf.while_loop` fails in TF 2.21, docs/pitfalls.md#P6).
* `"forward_over_backward"`: `tf.autodiff.ForwardAccumulator` around a
  `tf.GradientTape`. Exact too, and kept for comparison: TF computes each
  op's JVP by transposing its backward function, so it has no arithmetic
  advantage and its traces are larger.

Both are exact through normalization layers because the model function
runs under `functional.exact_moments()`. Embedding gradients and their
tangents arrive as `IndexedSlices` and are densified (docs/pitfalls.md#P3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import curvature, spectrum
from tf_breakeven.curvature import directional_curvature  # noqa: F401
from tf_breakeven.functional import (
    Batch,
    LossLike,
    ModelFunction,
    check_vector,
    dense,
)
from tf_breakeven.operators import (
    Kernel,
    ProbeOperator,
    batch_signature,
    cached_kernel,
    loss_key,
)
from tf_breakeven.spectrum import Eigenpairs
from tf_breakeven.validation import check_choice

METHODS = ("auto", "forward_over_backward", "backward_over_backward")
# Kept for code that imported the old name.
HessianEigenpairs = Eigenpairs
_ZERO = tf.UnconnectedGradients.ZERO


class HessianKernel(Kernel):
    """The per-batch Hessian functions of one model configuration.

    Shared by every operator on the same model and configuration
    (`hessian_kernel`), so its `tf.function`s are traced once per batch
    signature, not once per call.

    Attributes:
        function: the model and loss as a pure function.
        method: the HVP method in use (never "auto").
        losses: `tf.function` `(x, y, sample_weight) -> per-example losses`.
        hvp: `tf.function` `(vector, x, y, sample_weight) -> sum over the
            batch of the per-example Hessians times vector`.
    """

    def __init__(self, function: ModelFunction, method: str, jit: bool):
        super().__init__(function)
        self.method = method
        self.hvp = tf.function(self.batch_hvp, jit_compile=jit)

    def batch_hvp(self, vector, x, y, sample_weight):
        """H_sum v on one batch, untraced (call it inside a `tf.function`).

        H_sum is the Hessian of the *sum* of the batch's weighted
        per-example losses at the model's current parameters; divide by the
        number of examples for the Hessian of the mean.
        """
        fn = self.function
        params, state = fn.primal_parameters(), fn.read_state()
        dtypes = [v.dtype for v in vector]
        vector = [tf.cast(v, fn.dtype) for v in vector]  # float16 models
        batch = Batch(x, y, sample_weight)
        if self.method == "forward_over_backward":
            with tf.autodiff.ForwardAccumulator(params, vector) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(params)
                    total = fn.loss_sum(params, state, batch)
                grads = tape.gradient(
                    total, params, unconnected_gradients=_ZERO
                )
                grads = [dense(g, p) for g, p in zip(grads, params)]
            tangents = acc.jvp(grads, unconnected_gradients=_ZERO)
        else:
            with tf.GradientTape() as outer:
                outer.watch(params)
                with tf.GradientTape() as inner:
                    inner.watch(params)
                    total = fn.loss_sum(params, state, batch)
                grads = inner.gradient(
                    total, params, unconnected_gradients=_ZERO
                )
                inner_product = tf.add_n(
                    [
                        tf.reduce_sum(dense(g, p) * v)
                        for g, p, v in zip(grads, params, vector)
                    ]
                )
            tangents = outer.gradient(
                inner_product, params, unconnected_gradients=_ZERO
            )
            # A NaN or Inf loss (a diverged run) must give a NaN product, but
            # reverse mode can drop it: ReluGrad masks a NaN activation to 0.
            # Adding 0 * loss is exact otherwise (docs/pitfalls.md#P29).
            guard = tf.zeros_like(total) * total
            tangents = [
                dense(t, p) + tf.cast(guard, p.dtype)
                for t, p in zip(tangents, params)
            ]
        return [
            tf.cast(dense(t, p), dtype)
            for t, p, dtype in zip(tangents, params, dtypes)
        ]


def hessian_kernel(
    model: keras.Model,
    loss: LossLike = None,
    *,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
    jit_compile: bool = False,
) -> HessianKernel:
    """The shared `HessianKernel` of a model configuration.

    Args:
        model, loss, training, include_regularization, method, jit_compile:
            see `HessianOperator`.
    """
    check_choice("method", method, METHODS)
    function = ModelFunction(
        model,
        loss,
        training=training,
        include_regularization=include_regularization,
    )
    if method == "auto":
        method = "backward_over_backward"
    key = (
        "hessian",
        loss_key(loss),
        bool(training),
        bool(include_regularization),
        method,
        bool(jit_compile),
    )
    return cached_kernel(
        model, key, lambda: HessianKernel(function, method, jit_compile)
    )


class HessianOperator(ProbeOperator):
    """The Hessian of the mean probe-set loss as a matrix-free operator.

    A linear operator: `matvec`, `flat_matvec`, `dim`, `dtype`, `shapes`.
    Reads the model's current variables at every call, so one operator can
    follow a training run. Its `tf.function`s are traced once per batch
    shape and reused across calls and across operators on the same model.
    The solvers of `tf_breakeven.spectrum` (eigenpairs, trace, density)
    take it, or any operator of the same shape; `eigenpairs`, `trace` and
    `spectral_density` are shortcuts to them.

    Example:
        >>> op = HessianOperator(model, (x, y))
        >>> hv = op.matvec([tf.ones_like(v) for v in model.trainable_variables])
        >>> op.eigenpairs(k=3).eigenvalues

    Args:
        model: a built Keras model.
        data: `(x, y)`, `(x, y, sample_weight)`, or a finite
            `tf.data.Dataset` of such batches (the probe set).
        loss: None for the compiled loss, else a Keras loss, its name or a
            callable `fn(y_true, y_pred)` returning per-example losses.
        training: run the model in training mode (default, the function
            SGD optimizes) or inference mode.
        include_regularization: add the model's regularization losses.
        method: "auto", "forward_over_backward" or "backward_over_backward"
            (see the module docstring).
        jit_compile: compile the per-batch functions and solvers with XLA
            (needed on TPUs; slower on CPU, docs/pitfalls.md#P7).

    Raises:
        ValueError: no loss, empty or malformed data, data that does not fit
            the model.
    """

    def __init__(
        self,
        model: keras.Model,
        data: Any,
        *,
        loss: LossLike = None,
        training: bool = True,
        include_regularization: bool = True,
        method: str = "auto",
        jit_compile: bool = False,
    ):
        self.kernel = hessian_kernel(
            model,
            loss,
            training=training,
            include_regularization=include_regularization,
            method=method,
            jit_compile=jit_compile,
        )
        super().__init__(
            self.kernel.function,
            data,
            self.kernel.losses,
            jit_compile=jit_compile,
        )

    @property
    def method(self) -> str:
        return self.kernel.method

    def matvec(self, vector: Sequence[Any]) -> list[tf.Tensor]:
        """H v for v shaped like `model.trainable_variables`."""
        vector = check_vector(vector, self.shapes, self.dtype)
        return self._matvec(vector)

    def _matvec(self, vector: list[tf.Tensor]) -> list[tf.Tensor]:
        total = self.sum_over_batches(self.kernel.hvp, (vector,))
        scale = tf.constant(1.0 / self.num_examples, self.dtype)
        return [t * scale for t in total]

    def flat_matvec(self, vector: tf.Tensor) -> tf.Tensor:
        """H v on a flat vector of length `dim` (for `linalg` solvers)."""
        return self.to_flat(self._matvec(self.from_flat(vector)))

    def solver_inputs(self) -> tuple[HessianKernel, tuple, list[Batch]]:
        """`(kernel, probe signature, batches)`: the solvers of `spectrum`
        take the batches as arguments, so every operator of this kernel on
        batches of the same shapes shares their traces."""
        key = (
            tuple(batch_signature(b) for b in self.batches),
            self.num_examples,
            self.jit_compile,
            self.strategy is None,
        )
        return self.kernel, key, self.batches

    def with_inputs(self, batches: list[Batch] | None) -> HessianOperator:
        """A copy of this operator on `batches` (of the same shapes)."""
        bound = copy.copy(self)
        bound.batches = batches
        return bound

    def directional_curvature(self, direction: Sequence[Any]) -> tf.Tensor:
        """`e^T H_i e` for every probe example; see
        `tf_breakeven.curvature.directional_curvature`."""
        return curvature.probe_curvature(self, direction)

    def eigenpairs(self, k: int = 1, **kwargs: Any) -> Eigenpairs:
        """Top or bottom k eigenpairs; see `spectrum.eigenpairs`."""
        return spectrum.eigenpairs(self, k, **kwargs)

    def trace(self, **kwargs: Any) -> float:
        """Trace estimate; see `spectrum.trace`."""
        return spectrum.trace(self, **kwargs)

    def spectral_density(self, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """SLQ spectral density; see `spectrum.spectral_density`."""
        return spectrum.spectral_density(self, **kwargs)


def hessian_vector_product(
    model: keras.Model,
    data: Any,
    vector: Sequence[Any],
    *,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
    jit_compile: bool = False,
) -> list[tf.Tensor]:
    """Hessian of the mean probe loss times `vector`.

    Args:
        model: a built Keras model.
        data: `(x, y[, sample_weight])` or a finite `tf.data.Dataset` of such
            batches.
        vector: tensors shaped like `model.trainable_variables`.
        loss, training, include_regularization, method, jit_compile: see
            `HessianOperator`.

    Returns:
        H v, a list of tensors shaped like `model.trainable_variables`.
    """
    op = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=method,
        jit_compile=jit_compile,
    )
    return op.matvec(vector)


def hessian_eigenpairs(
    model: keras.Model,
    data: Any,
    k: int = 1,
    *,
    which: str = "largest",
    num_iterations: int | None = None,
    tol: float = spectrum.DEFAULT_TOL,
    seed: int = 0,
    start_vector: Sequence[Any] | None = None,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
    jit_compile: bool = False,
) -> Eigenpairs:
    """Top (`which="largest"`, descending) or bottom (ascending) k eigenpairs.

    Lanczos with full reorthogonalization on Hessian-vector products,
    stopping once every pair's residual is below `tol` relative to its
    eigenvalue (default 1e-2; `tol=0.0` runs all `num_iterations`); see
    `spectrum.eigenpairs` and `linalg.eigsh` (default number of
    iterations). Calls on data of the same shapes reuse one trace.

    Returns:
        `Eigenpairs(eigenvalues, eigenvectors)`, with `residuals`,
        `converged` and `num_iterations` attributes.
    """
    op = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=method,
        jit_compile=jit_compile,
    )
    return spectrum.eigenpairs(
        op,
        k,
        which=which,
        num_iterations=num_iterations,
        tol=tol,
        seed=seed,
        start_vector=start_vector,
    )


def hessian_eigenvalues(
    model: keras.Model, data: Any, k: int = 1, **kwargs: Any
) -> np.ndarray:
    """Top or bottom k Hessian eigenvalues; arguments of `hessian_eigenpairs`.

    Returns:
        float64 array of shape [k]: descending for `which="largest"`,
        ascending for `which="smallest"`.
    """
    return hessian_eigenpairs(model, data, k, **kwargs).eigenvalues


def hessian_trace(
    model: keras.Model,
    data: Any,
    *,
    num_samples: int = 30,
    method: str = "hutch++",
    seed: int = 0,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    hvp_method: str = "auto",
    jit_compile: bool = False,
) -> float:
    """Tr(H) by Hutch++ (default) or Hutchinson with `num_samples` HVPs.

    `method` names the trace estimator; `hvp_method` is the `method` of
    `HessianOperator`.
    """
    op = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=hvp_method,
        jit_compile=jit_compile,
    )
    return spectrum.trace(op, num_samples=num_samples, method=method, seed=seed)


def hessian_spectral_density(
    model: keras.Model,
    data: Any,
    *,
    num_runs: int = 1,
    num_iterations: int = 80,
    grid: int | np.ndarray = 1000,
    sigma: float | None = None,
    seed: int = 0,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
    jit_compile: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Hessian eigenvalue density by SLQ (Ghorbani et al. 2019).

    Returns:
        `(grid, density)`, float64 arrays for plotting; integrates to 1.
    """
    op = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=method,
        jit_compile=jit_compile,
    )
    return spectrum.spectral_density(
        op,
        num_runs=num_runs,
        num_iterations=num_iterations,
        grid=grid,
        sigma=sigma,
        seed=seed,
    )
