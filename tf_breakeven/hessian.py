"""Hessian of the probe-set loss of a Keras model, matrix-free.

`HessianOperator` turns a model, a loss and a probe set into the operator
`v -> H v`, where H is the Hessian of the mean loss over all probe examples
with respect to the trainable variables (see `functional` for what "the
loss" means). The solvers of `linalg` then give its top/bottom eigenpairs,
trace and spectral density.

How the Hessian-vector product is computed (`method`):

* `"forward_over_backward"`: `tf.autodiff.ForwardAccumulator` around a
  `tf.GradientTape`, about two gradients' cost. The default for every model
  without a rolled recurrent layer.
* `"backward_over_backward"`: the gradient of `<grad, v>`. Used
  automatically (`method="auto"`) when a Keras RNN layer (LSTM, GRU, ...)
  runs with `unroll=False`: forward mode through the backward pass of a
  `tf.while_loop` fails in TF 2.21 (TRAPS.md 6), double backward does not.

Both are exact through normalization layers because the model function
runs under `functional.exact_moments()`. Embedding gradients and their
tangents arrive as `IndexedSlices` and are densified (TRAPS.md 3).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import linalg
from tf_breakeven.distribute import replica_strategy, sum_over_batches
from tf_breakeven.functional import (
    Batch,
    LossLike,
    ModelFunction,
    check_vector,
    dense,
    num_examples,
    probe_batches,
)

_METHODS = ("auto", "forward_over_backward", "backward_over_backward")
_ZERO = tf.UnconnectedGradients.ZERO


class HessianEigenpairs(NamedTuple):
    """Eigenvalues (numpy, float64) and eigenvectors.

    `eigenvectors[j]` is a list of tensors shaped like
    `model.trainable_variables`, of unit total norm.
    """

    eigenvalues: np.ndarray
    eigenvectors: list[list[tf.Tensor]]


class _Kernel:
    """Per-batch derivative functions of one model configuration.

    Shared by every operator on the same model and configuration, so their
    `tf.function`s are traced once per batch signature, not once per call.
    """

    def __init__(self, function: ModelFunction, method: str, jit: bool):
        self.function = function
        self.method = method
        self.losses = tf.function(self._losses)
        self.hvp = tf.function(self._hvp, jit_compile=jit)
        self.curvature = tf.function(self._curvature, jit_compile=jit)

    def _losses(self, x, y, sample_weight):
        fn = self.function
        return fn.per_example_losses(
            fn.read_parameters(), fn.read_state(), x, y, sample_weight
        )

    def _hvp(self, vector, x, y, sample_weight):
        fn = self.function
        params, state = fn.read_parameters(), fn.read_state()
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
        return [dense(t, p) for t, p in zip(tangents, params)]

    def _curvature(self, direction, x, y, sample_weight):
        # Second directional derivative of every per-example loss at once:
        # forward over forward, d^2/dt^2 l_i(theta + t e) = e^T H_i e.
        fn = self.function
        params, state = fn.read_parameters(), fn.read_state()
        with tf.autodiff.ForwardAccumulator(params, direction) as outer:
            with tf.autodiff.ForwardAccumulator(params, direction) as inner:
                losses = fn.per_example_losses(
                    params, state, x, y, sample_weight
                )
            first = inner.jvp(losses, unconnected_gradients=_ZERO)
        return outer.jvp(first, unconnected_gradients=_ZERO)


_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kernel_for(
    model: keras.Model,
    loss: LossLike,
    training: bool,
    include_regularization: bool,
    method: str,
    jit_compile: bool,
) -> _Kernel:
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
    function = ModelFunction(
        model,
        loss,
        training=training,
        include_regularization=include_regularization,
    )
    if method == "auto":
        method = (
            "backward_over_backward"
            if function.has_rolled_recurrence
            else "forward_over_backward"
        )
    key = (
        id(loss) if loss is not None and not isinstance(loss, str) else loss,
        bool(training),
        bool(include_regularization),
        method,
        bool(jit_compile),
    )
    per_model = _KERNELS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _Kernel(function, method, jit_compile)
    return per_model[key]


def _signature(batch: Batch) -> tuple:
    def spec(t):
        return (tuple(t.shape), t.dtype)

    return (
        tuple(spec(t) for t in tf.nest.flatten(batch.x)),
        tuple(spec(t) for t in tf.nest.flatten(batch.y)),
        None if batch.sample_weight is None else spec(batch.sample_weight),
    )


class HessianOperator:
    """The Hessian of the mean probe-set loss as a matrix-free operator.

    Reads the model's current variables at every call, so one operator can
    follow a training run. Its `tf.function`s are traced once per batch
    shape and reused across calls and across operators on the same model.

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
            (needed on TPUs; slower on CPU, TRAPS.md 7 and 17).

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
        self._kernel = _kernel_for(
            model, loss, training, include_regularization, method, jit_compile
        )
        self.function = self._kernel.function
        self.batches = probe_batches(data)
        self.num_examples = num_examples(self.batches)
        self.jit_compile = bool(jit_compile)
        self._solvers: dict = {}
        self._check_data()

    @property
    def method(self) -> str:
        return self._kernel.method

    @property
    def dim(self) -> int:
        """Number of trainable parameters (the operator's dimension)."""
        return self.function.dim

    @property
    def dtype(self) -> tf.DType:
        return self.function.dtype

    @property
    def shapes(self) -> list[tf.TensorShape]:
        return self.function.shapes

    def _check_data(self) -> None:
        seen = set()
        for batch in self.batches:
            signature = _signature(batch)
            if signature in seen:
                continue
            seen.add(signature)
            try:
                self._kernel.losses.get_concrete_function(*batch)
            except (ValueError, TypeError, tf.errors.OpError) as error:
                raise ValueError(
                    "The probe data does not fit the model or the loss "
                    f"(batch signature {signature}): {error}. Pass inputs "
                    "shaped like the model's inputs and targets the loss "
                    "accepts."
                ) from error

    def matvec(self, vector: Sequence[Any]) -> list[tf.Tensor]:
        """H v for v shaped like `model.trainable_variables`."""
        vector = check_vector(vector, self.shapes, self.dtype)
        return self._matvec(vector)

    def _matvec(self, vector: list[tf.Tensor]) -> list[tf.Tensor]:
        # Under a multi-replica strategy each replica takes a batch at a
        # time and the products are summed (`tf_breakeven.distribute`).
        strategy = (
            None if self.jit_compile else replica_strategy(self.function.model)
        )
        total = sum_over_batches(
            strategy, self._kernel.hvp, (vector,), self.batches
        )
        scale = tf.constant(1.0 / self.num_examples, self.dtype)
        return [t * scale for t in total]

    def flat_matvec(self, vector: tf.Tensor) -> tf.Tensor:
        """H v on a flat vector of length `dim` (for `linalg` solvers)."""
        parts = linalg.unflatten_tensors(vector, self.shapes)
        return linalg.flatten_tensors(self._matvec(parts))

    def directional_curvature(self, direction: Sequence[Any]) -> tf.Tensor:
        """Per-example curvature `e^T H_i e` for every probe example, [N].

        H_i is the Hessian of example i's (weighted) loss, computed for all
        examples at once by forward-over-forward differentiation of the
        vector of per-example losses. In training mode with
        BatchNormalization, l_i depends on the whole batch through its
        statistics, and H_i is the Hessian of that coupled l_i; in every
        case `mean_i e^T H_i e == e^T H e`. `e` is used as given (normalize
        it for the curvature along a direction).
        """
        direction = check_vector(direction, self.shapes, self.dtype)
        return tf.concat(
            [self._kernel.curvature(direction, *b) for b in self.batches],
            axis=0,
        )

    def _solver(self, key: tuple, build):
        if key not in self._solvers:
            self._solvers[key] = tf.function(
                build, jit_compile=self.jit_compile
            )
        return self._solvers[key]

    def _structured(self, flat_vectors: tf.Tensor) -> list[list[tf.Tensor]]:
        return [
            linalg.unflatten_tensors(v, self.shapes)
            for v in tf.unstack(flat_vectors)
        ]

    def eigenpairs(
        self,
        k: int = 1,
        *,
        which: str = "largest",
        num_iterations: int | None = None,
        seed: int = 0,
        start_vector: Sequence[Any] | None = None,
    ) -> HessianEigenpairs:
        """Top or bottom k eigenpairs by Lanczos (see `linalg.eigsh`)."""
        dim = self.dim
        # Validate eagerly in Python before any tracing.
        linalg.eigsh_config(dim, k, which=which, num_iterations=num_iterations)

        def run(start):
            return linalg.eigsh(
                self.flat_matvec,
                dim,
                k,
                which=which,
                num_iterations=num_iterations,
                start_vector=start,
                seed=seed,
                dtype=self.dtype,
            )

        key = ("eigsh", k, which, num_iterations, seed, start_vector is None)
        if start_vector is None:
            result = self._solver(key, lambda: run(None))()
        else:
            start = linalg.flatten_tensors(
                check_vector(start_vector, self.shapes, self.dtype)
            )
            result = self._solver(key, run)(start)
        return HessianEigenpairs(
            np.asarray(result.eigenvalues, np.float64),
            self._structured(result.eigenvectors),
        )

    def trace(
        self, *, num_samples: int = 30, method: str = "hutch++", seed: int = 0
    ) -> float:
        """Trace estimate by Hutch++ (default) or Hutchinson."""
        estimators = {
            "hutch++": linalg.hutchpp_trace,
            "hutchinson": linalg.hutchinson_trace,
        }
        if method not in estimators:
            raise ValueError(
                f"`method` must be 'hutch++' or 'hutchinson'; got {method!r}."
            )
        estimator = estimators[method]
        key = ("trace", method, num_samples, seed)
        fn = self._solver(
            key,
            lambda: estimator(
                self.flat_matvec,
                self.dim,
                num_samples,
                seed=seed,
                dtype=self.dtype,
            ),
        )
        return float(fn())

    def spectral_density(
        self,
        *,
        num_runs: int = 1,
        num_iterations: int = 80,
        grid: int | np.ndarray = 1000,
        sigma: float | None = None,
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Spectral density by stochastic Lanczos quadrature.

        Returns:
            `(grid, density)` float64 arrays; the density integrates to 1.
        """
        if num_runs < 1:
            raise ValueError(f"`num_runs` must be >= 1; got {num_runs}.")
        num_iterations = min(int(num_iterations), self.dim)
        if num_iterations < 1:
            raise ValueError(
                f"`num_iterations` must be >= 1; got {num_iterations}."
            )
        key = ("slq", num_runs, num_iterations, seed)
        fn = self._solver(
            key,
            lambda: linalg.slq(
                self.flat_matvec,
                self.dim,
                num_runs,
                num_iterations,
                seed=seed,
                dtype=self.dtype,
            ),
        )
        nodes, weights = fn()
        if isinstance(grid, (int, np.integer)):
            return linalg.spectral_density(
                nodes, weights, num_points=int(grid), sigma=sigma
            )
        return linalg.spectral_density(nodes, weights, grid=grid, sigma=sigma)


def _operator(model, data, loss, training, include_regularization, method):
    return HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=method,
    )


def hessian_vector_product(
    model: keras.Model,
    data: Any,
    vector: Sequence[Any],
    *,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
) -> list[tf.Tensor]:
    """Hessian of the mean probe loss times `vector`.

    Args:
        model: a built Keras model.
        data: `(x, y[, sample_weight])` or a finite `tf.data.Dataset` of such
            batches.
        vector: tensors shaped like `model.trainable_variables`.
        loss, training, include_regularization, method: see
            `HessianOperator`.

    Returns:
        H v, a list of tensors shaped like `model.trainable_variables`.
    """
    op = _operator(model, data, loss, training, include_regularization, method)
    return op.matvec(vector)


def hessian_eigenpairs(
    model: keras.Model,
    data: Any,
    k: int = 1,
    *,
    which: str = "largest",
    num_iterations: int | None = None,
    seed: int = 0,
    start_vector: Sequence[Any] | None = None,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
) -> HessianEigenpairs:
    """Top (`which="largest"`, descending) or bottom (ascending) k eigenpairs.

    Lanczos with full reorthogonalization on Hessian-vector products; see
    `linalg.eigsh` for the default number of iterations.

    Returns:
        `HessianEigenpairs(eigenvalues, eigenvectors)`.
    """
    op = _operator(model, data, loss, training, include_regularization, method)
    return op.eigenpairs(
        k,
        which=which,
        num_iterations=num_iterations,
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
) -> float:
    """Tr(H) by Hutch++ (default) or Hutchinson with `num_samples` HVPs."""
    op = _operator(model, data, loss, training, include_regularization, "auto")
    return op.trace(num_samples=num_samples, method=method, seed=seed)


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
) -> tuple[np.ndarray, np.ndarray]:
    """Hessian eigenvalue density by SLQ (Ghorbani et al. 2019).

    Returns:
        `(grid, density)`, float64 arrays for plotting; integrates to 1.
    """
    op = _operator(model, data, loss, training, include_regularization, "auto")
    return op.spectral_density(
        num_runs=num_runs,
        num_iterations=num_iterations,
        grid=grid,
        sigma=sigma,
        seed=seed,
    )


def directional_curvature(
    model: keras.Model,
    data: Any,
    direction: Sequence[Any],
    *,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
) -> tf.Tensor:
    """Per-example curvature `e^T H_i e` along `direction` for every example.

    See `HessianOperator.directional_curvature`. Its variance over examples
    is the s^2 of the SGD stability condition (break-even paper, eq. 1).

    Returns:
        A tensor of shape [num_examples].
    """
    op = _operator(model, data, loss, training, include_regularization, "auto")
    return op.directional_curvature(direction)
