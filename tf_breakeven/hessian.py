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
from tf_breakeven.blocks import BlocksLike, flat_columns, variable_blocks
from tf_breakeven.curvature import directional_curvature  # noqa: F401
from tf_breakeven.functional import (
    Batch,
    LossLike,
    ModelFunction,
    check_vector,
    dense,
    num_examples,
)
from tf_breakeven.operators import (
    Kernel,
    ProbeOperator,
    batch_signature,
    cached_kernel,
    loss_key,
)
from tf_breakeven.spectrum import Eigenpairs
from tf_breakeven.validation import ArgumentError, check_choice, check_int

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
        gradient: `tf.function` `(x, y, sample_weight) -> gradient of the
            batch's summed loss` (in the function's dtype).
        self_curvature: `tf.function` `(x, y, sample_weight) -> g^T H g /
            ||g||^2` for the gradient g and Hessian H of the batch's mean
            loss (NaN when g = 0).
    """

    def __init__(self, function: ModelFunction, method: str, jit: bool):
        super().__init__(function)
        self.method = method
        self.jit = jit
        self.hvp = tf.function(self.batch_hvp, jit_compile=jit)
        self.gradient = tf.function(self.batch_gradient, jit_compile=jit)
        self.self_curvature = tf.function(
            self.batch_self_curvature, jit_compile=jit
        )
        self._block_hvps: dict[tuple[int, ...], Any] = {}

    def block_hvp(self, indices: Sequence[int]) -> Any:
        """`hvp` of the diagonal block of the variables at `indices`:
        `(vector, x, y, sample_weight)`, `vector` and the result shaped
        like those variables (one `tf.function` per block)."""
        indices = tuple(indices)
        if indices not in self._block_hvps:
            self._block_hvps[indices] = tf.function(
                lambda vector, x, y, w: self.batch_hvp(
                    vector, x, y, w, indices=indices
                ),
                jit_compile=self.jit,
            )
        return self._block_hvps[indices]

    def batch_gradient(self, x, y, sample_weight):
        """Gradient of the batch's summed loss, untraced."""
        fn = self.function
        params, state = fn.primal_parameters(), fn.read_state()
        with tf.GradientTape() as tape:
            tape.watch(params)
            total = fn.loss_sum(params, state, Batch(x, y, sample_weight))
        grads = tape.gradient(total, params, unconnected_gradients=_ZERO)
        return [dense(g, p) for g, p in zip(grads, params)]

    def batch_self_curvature(self, x, y, sample_weight):
        """`g^T H g / ||g||^2` of the batch's mean loss, untraced.

        With g_s, H_s of the summed loss over S examples, g = g_s / S and
        H = H_s / S, so the ratio is `g_s^T H_s g_s / (S ||g_s||^2)`; one
        double-backward pass (the tangent is the gradient itself).
        """
        fn = self.function
        params = fn.primal_parameters()
        grads, products = self._double_backward(
            params, range(len(params)), Batch(x, y, sample_weight), None
        )
        size = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], fn.dtype)
        curvature = tf.add_n(
            [tf.reduce_sum(g * h) for g, h in zip(grads, products)]
        )
        squared = tf.add_n([tf.reduce_sum(g * g) for g in grads])
        return curvature / (size * squared)

    def _double_backward(self, params, indices, batch, vector):
        """`(g_s, H_s v)` over the variables at `indices` by reverse over
        reverse mode; `vector=None` takes v = g_s (held constant).

        A NaN or Inf loss (a diverged run) must give a NaN product, but
        reverse mode can drop it: ReluGrad masks a NaN activation to 0.
        Adding 0 * loss is exact otherwise (docs/pitfalls.md#P29).
        """
        fn = self.function
        state = fn.read_state()
        watched = [params[i] for i in indices]
        with tf.GradientTape() as outer:
            outer.watch(watched)
            with tf.GradientTape() as inner:
                inner.watch(watched)
                total = fn.loss_sum(params, state, batch)
            grads = inner.gradient(total, watched, unconnected_gradients=_ZERO)
            grads = [dense(g, p) for g, p in zip(grads, watched)]
            if vector is None:
                vector = [tf.stop_gradient(g) for g in grads]
            inner_product = tf.add_n(
                [tf.reduce_sum(g * v) for g, v in zip(grads, vector)]
            )
        tangents = outer.gradient(
            inner_product, watched, unconnected_gradients=_ZERO
        )
        guard = tf.zeros_like(total) * total
        tangents = [
            dense(t, p) + tf.cast(guard, p.dtype)
            for t, p in zip(tangents, watched)
        ]
        return grads, tangents

    def batch_hvp(self, vector, x, y, sample_weight, indices=None):
        """H_sum v on one batch, untraced (call it inside a `tf.function`).

        H_sum is the Hessian of the *sum* of the batch's weighted
        per-example losses at the model's current parameters; divide by the
        number of examples for the Hessian of the mean. With `indices`, the
        diagonal block of the variables at those indices (`vector` shaped
        like them; the other variables are held fixed).
        """
        fn = self.function
        params = fn.primal_parameters()
        indices = range(len(params)) if indices is None else indices
        watched = [params[i] for i in indices]
        dtypes = [v.dtype for v in vector]
        vector = [tf.cast(v, fn.dtype) for v in vector]  # float16 models
        batch = Batch(x, y, sample_weight)
        if self.method == "forward_over_backward":
            state = fn.read_state()
            with tf.autodiff.ForwardAccumulator(watched, vector) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(watched)
                    total = fn.loss_sum(params, state, batch)
                grads = tape.gradient(
                    total, watched, unconnected_gradients=_ZERO
                )
                grads = [dense(g, p) for g, p in zip(grads, watched)]
            tangents = acc.jvp(grads, unconnected_gradients=_ZERO)
        else:
            tangents = self._double_backward(params, indices, batch, vector)[1]
        return [
            tf.cast(dense(t, p), dtype)
            for t, p, dtype in zip(tangents, watched, dtypes)
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

    def gradient(self) -> list[tf.Tensor]:
        """Gradient of the mean probe loss, shaped like the variables."""
        total = self.sum_over_batches(self.kernel.gradient, ())
        scale = tf.constant(1.0 / self.num_examples, self.dtype)
        return [t * scale for t in total]

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
        """A copy of this operator on `batches` (None: a template without
        a probe, for the compiled solvers)."""
        bound = copy.copy(self)
        bound.batches = batches
        if batches is not None:
            bound.num_examples = num_examples(batches)
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


class BlockHessianOperator(HessianOperator):
    """A diagonal block of the probe Hessian: the variables at `indices`.

    `H_bb`, the Hessian of the mean probe loss with respect to a group of
    variables (e.g. one layer's, `tf_breakeven.blocks.variable_blocks`)
    with the others held fixed. Vectors are shaped like those variables;
    each HVP differentiates only with respect to them.

    Args:
        model, data: see `HessianOperator`.
        indices: indices into `model.trainable_variables`.
        **kwargs: the options of `HessianOperator`.
    """

    def __init__(
        self,
        model: keras.Model,
        data: Any,
        indices: Sequence[int],
        **kwargs: Any,
    ):
        super().__init__(model, data, **kwargs)
        self._select(indices)

    def _select(self, indices: Sequence[int]) -> None:
        """Makes this the block of `indices`: the indices, the block's HVP
        and its 0/1 coordinate mask in the flat parameter vector."""
        self.indices = tuple(sorted(int(i) for i in indices))
        count = len(self.function.shapes)
        if not self.indices or not all(0 <= i < count for i in self.indices):
            raise ArgumentError(
                f"Block indices {list(indices)} must be a non-empty list of "
                f"indices into the model's {count} trainable variables."
            )
        self._block_hvp = self.kernel.block_hvp(self.indices)
        mask = np.zeros(self.function.dim)
        for start, stop in flat_columns(self.function.shapes, self.indices):
            mask[start:stop] = 1.0
        self._mask = tf.constant(mask, self.dtype)

    @property
    def shapes(self) -> list[tf.TensorShape]:
        full = self.function.shapes
        return [full[i] for i in self.indices]

    def _subspace(self) -> _SubspaceView:
        """This block as the full Hessian restricted to its coordinates,
        the form the solvers take: every block of one model shares one
        compiled solver (the coordinates are one of its inputs)."""
        view = object.__new__(_SubspaceView)
        view.__dict__.update(self.__dict__)
        view.subspace = self._mask
        return view

    def eigenpairs(
        self,
        k: int = 1,
        *,
        start_vector: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> Eigenpairs:
        """Top or bottom k eigenpairs of the block H_bb (`spectrum.eigenpairs`
        arguments); eigenvectors shaped like the block's variables.

        Solved as the full operator restricted to the block's coordinates
        (`linalg.eigsh(subspace=...)`), so the blocks of a model share one
        trace; `spectrum.eigenpairs(block_operator)` gives the same numbers
        with one trace per block.
        """
        k = check_int("k", k, 1)
        if k > self.dim:
            raise ArgumentError(
                f"k={k} exceeds the {self.dim} parameters of the block; "
                "pass a smaller k."
            )
        if start_vector is not None:
            start_vector = self._pad(
                check_vector(start_vector, self.shapes, self.dtype)
            )
        pairs = spectrum.eigenpairs(
            self._subspace(), k, start_vector=start_vector, **kwargs
        )
        return Eigenpairs(
            pairs.eigenvalues,
            [[u[i] for i in self.indices] for u in pairs.eigenvectors],
            residuals=pairs.residuals,
            converged=pairs.converged,
            num_iterations=pairs.num_iterations,
            tol=pairs.tol,
        )

    def _pad(self, block: list[tf.Tensor]) -> list[tf.Tensor]:
        """A block-shaped vector as a full one, zero outside the block."""
        full = [tf.zeros(s, self.dtype) for s in self.function.shapes]
        for i, part in zip(self.indices, block):
            full[i] = part
        return full

    @property
    def dim(self) -> int:
        return sum(s.num_elements() for s in self.shapes)

    def for_block(self, indices: Sequence[int]) -> BlockHessianOperator:
        """This operator's probe and options on another block."""
        other = copy.copy(self)
        other._select(indices)
        return other

    def _matvec(self, vector: list[tf.Tensor]) -> list[tf.Tensor]:
        total = self.sum_over_batches(self._block_hvp, (vector,))
        scale = tf.constant(1.0 / self.num_examples, self.dtype)
        return [t * scale for t in total]

    def gradient(self) -> list[tf.Tensor]:
        """The block's part of the gradient of the mean probe loss."""
        full = super().gradient()
        return [full[i] for i in self.indices]

    def solver_inputs(self) -> tuple[HessianKernel, tuple, list[Batch]]:
        kernel, key, batches = super().solver_inputs()
        return kernel, key + (("block",) + self.indices,), batches

    def directional_curvature(self, direction: Sequence[Any]) -> tf.Tensor:
        """`e^T H_i e` for `e` in the block (zero elsewhere)."""
        direction = check_vector(direction, self.shapes, self.dtype)
        return curvature.probe_curvature(self._subspace(), self._pad(direction))


class _SubspaceView(HessianOperator):
    """The full Hessian operator restricted to the coordinates of a 0/1
    vector `subspace`: `v -> s * H (s * v)`, with `subspace` among the
    compiled solvers' inputs (see `BlockHessianOperator.eigenpairs`)."""

    subspace: tf.Tensor | None

    def flat_matvec(self, vector: tf.Tensor) -> tf.Tensor:
        return self.subspace * super().flat_matvec(self.subspace * vector)

    def solver_inputs(self) -> tuple[HessianKernel, tuple, Any]:
        kernel, key, batches = super().solver_inputs()
        return kernel, key + ("subspace",), (batches, self.subspace)

    def with_inputs(self, inputs: Any) -> _SubspaceView:
        batches, subspace = (None, None) if inputs is None else inputs
        bound = super().with_inputs(batches)
        bound.subspace = subspace
        return bound


def block_operators(
    model: keras.Model, data: Any, blocks: BlocksLike, **kwargs: Any
) -> dict[str, BlockHessianOperator]:
    """One `BlockHessianOperator` per block of `variable_blocks(model,
    blocks)`, on one probe (validated once)."""
    named = variable_blocks(model, blocks)
    first = None
    operators = {}
    for name, indices in named.items():
        if first is None:
            first = BlockHessianOperator(model, data, indices, **kwargs)
            operators[name] = first
        else:
            operators[name] = first.for_block(indices)
    return operators


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
    blocks: BlocksLike | None = None,
) -> Eigenpairs | dict[str, Eigenpairs]:
    """Top (`which="largest"`, descending) or bottom (ascending) k eigenpairs.

    This function is long because it serves both the whole Hessian and its
    diagonal blocks, with one argument list.

    Lanczos with full reorthogonalization on Hessian-vector products,
    stopping once every pair's residual is below `tol` relative to its
    eigenvalue (default 1e-3; `tol=0.0` runs all `num_iterations`); see
    `spectrum.eigenpairs` and `linalg.eigsh` (default number of
    iterations). Calls on data of the same shapes reuse one trace.

    Args:
        blocks: None for the whole Hessian; "layer" (one block per
            top-level layer) or `{name: variables}` for the eigenpairs of
            each diagonal block H_bb (`tf_breakeven.blocks`). A block with
            fewer than k parameters gives all of its eigenpairs.
        Others: see `HessianOperator` and `spectrum.eigenpairs`.

    Returns:
        `Eigenpairs(eigenvalues, eigenvectors)`, with `residuals`,
        `converged` and `num_iterations` attributes; with `blocks`, a dict
        `{block name: Eigenpairs}` whose eigenvectors are shaped like the
        block's variables.
    """
    options = {
        "loss": loss,
        "training": training,
        "include_regularization": include_regularization,
        "method": method,
        "jit_compile": jit_compile,
    }
    solve = {
        "which": which,
        "num_iterations": num_iterations,
        "tol": tol,
        "seed": seed,
    }
    if blocks is None:
        op = HessianOperator(model, data, **options)
        return spectrum.eigenpairs(op, k, start_vector=start_vector, **solve)
    if start_vector is not None:
        raise ArgumentError(
            "`start_vector` is for the whole Hessian; with `blocks=` leave "
            "it out (each block starts from its own random vector)."
        )
    return {
        name: op.eigenpairs(min(k, op.dim), **solve)
        for name, op in block_operators(model, data, blocks, **options).items()
    }


def hessian_eigenvalues(
    model: keras.Model, data: Any, k: int = 1, **kwargs: Any
) -> np.ndarray | dict[str, np.ndarray]:
    """Top or bottom k Hessian eigenvalues; arguments of `hessian_eigenpairs`.

    Returns:
        float64 array of shape [k]: descending for `which="largest"`,
        ascending for `which="smallest"`. With `blocks=`, a dict `{block
        name: eigenvalues of that diagonal block}`.
    """
    pairs = hessian_eigenpairs(model, data, k, **kwargs)
    if isinstance(pairs, dict):
        return {name: p.eigenvalues for name, p in pairs.items()}
    return pairs.eigenvalues


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
