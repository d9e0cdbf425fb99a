"""Preconditioned sharpness of adaptive optimizers (Cohen et al. 2022).

An adaptive optimizer steps `w <- w - eta P^{-1} m` with a diagonal
preconditioner P read from its second-moment slots. Along the top
eigenvector of the *preconditioned* Hessian `P^{-1/2} H P^{-1/2}` such a
step is unstable once its top eigenvalue, the preconditioned sharpness,
exceeds a threshold ("Adaptive Gradient Methods at the Edge of
Stability", Cohen et al. 2022):

* Keras `Adam` and `AdamW` (`amsgrad` too, with its running maximum of v):
  with t = `optimizer.iterations` (steps taken) and v the second moments,
  `P = diag((1 - beta_1^t) (sqrt(v) + epsilon) / sqrt(1 - beta_2^t))`, so
  that Keras' last step was exactly `w <- w - eta P^{-1} m`; threshold
  `(2 + 2 beta_1) / (eta (1 - beta_1))` (38 / eta at beta_1 = 0.9).
* Keras `RMSprop`: `P = diag(sqrt(v + epsilon))` (Keras puts epsilon inside
  the root), `centered=True`: `sqrt(v - mean_g^2 + epsilon)`; threshold
  `2 (1 + momentum) / eta`.

P is read from the optimizer's variables (`optimizer.variables`, named
`<variable path with "/" as "_">_velocity` by Keras), never changed. Before
the first step the slots hold no second moments and P is undefined: the
functions raise, the callbacks record NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import spectrum, stability
from tf_breakeven.functional import LossLike
from tf_breakeven.hessian import HessianKernel, HessianOperator
from tf_breakeven.validation import ArgumentError

ADAPTIVE = ("adam", "rmsprop")


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside a mixed-precision `LossScaleOptimizer`."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def optimizer_kind(optimizer: Any) -> str:
    """ "adam" (Adam, AdamW), "rmsprop", "sgd", or "other"."""
    optimizer = unwrap(optimizer)
    if isinstance(optimizer, keras.optimizers.Adam):
        return "adam"
    if isinstance(optimizer, keras.optimizers.RMSprop):
        return "rmsprop"
    if isinstance(optimizer, keras.optimizers.SGD):
        return "sgd"
    return "other"


def has_stepped(optimizer: Any) -> bool:
    """Whether the optimizer has taken a step (so its slots hold moments)."""
    optimizer = unwrap(optimizer)
    return bool(optimizer.built) and int(optimizer.iterations.numpy()) > 0


def _slot(optimizer: Any, variable: Any, name: str) -> np.ndarray:
    wanted = f"{variable.path.replace('/', '_')}_{name}"
    found = [v for v in optimizer.variables if v.name == wanted]
    if not found:
        raise ArgumentError(
            f"{type(optimizer).__name__} holds no {name!r} slot for "
            f"{variable.path}: pass the optimizer that trains this model "
            "(or leave `optimizer=None` for the compiled one)."
        )
    if len(found) > 1:
        raise RuntimeError(
            f"tf_breakeven reads the {name!r} slot of {variable.path} from "
            f"{type(optimizer).__name__}.variables by Keras' slot name "
            f"{wanted!r} and found {len(found)} of them (Keras "
            f"{keras.__version__}). Give the model's variables unique paths, "
            "or update tf_breakeven.preconditioning."
        )
    return np.asarray(found[0].numpy(), np.float64)


def _hyperparameter(optimizer: Any, name: str) -> float:
    value = getattr(optimizer, name)
    if callable(value):
        value = value()
    return float(keras.ops.convert_to_numpy(value))


def _check_optimizer(model: keras.Model, optimizer: Any) -> Any:
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    optimizer = unwrap(optimizer)
    if optimizer is None:
        raise ArgumentError(
            "No optimizer: compile the model with Adam, AdamW or RMSprop, "
            "or pass `optimizer=`."
        )
    if optimizer_kind(optimizer) not in ADAPTIVE:
        raise ArgumentError(
            f"{type(optimizer).__name__} has no diagonal preconditioner; "
            "preconditioned sharpness is defined for Keras Adam, AdamW and "
            "RMSprop. For SGD use `hessian_eigenvalues` and the threshold "
            "2 (1 + momentum) / learning_rate."
        )
    if not has_stepped(optimizer):
        raise ArgumentError(
            f"The {type(optimizer).__name__} optimizer has taken no step, so "
            "its second moments (and P) are undefined; train at least one "
            "step first."
        )
    return optimizer


def preconditioner(
    model: keras.Model, optimizer: Any = None
) -> list[np.ndarray]:
    """The diagonal P of the optimizer's last step, float64 numpy arrays
    shaped like `model.trainable_variables` (see the module docstring).

    Args:
        model: the trained model.
        optimizer: Adam, AdamW or RMSprop; None for `model.optimizer`.

    Raises:
        ValueError: no optimizer, a non-adaptive one, or no step taken.
    """
    optimizer = _check_optimizer(model, optimizer)
    epsilon = _hyperparameter(optimizer, "epsilon")
    variables = model.trainable_variables
    if optimizer_kind(optimizer) == "rmsprop":
        result = []
        for variable in variables:
            second = _slot(optimizer, variable, "velocity")
            if optimizer.centered:
                mean = _slot(optimizer, variable, "average_gradient")
                second = second - mean**2
            result.append(np.sqrt(second + epsilon))
        return result
    t = float(optimizer.iterations.numpy())
    # Keras casts the Python-float betas through a float32 tensor
    # (`ops.cast(0.999, "float64")`), so its bias corrections use float32
    # betas even for float64 variables; so does P, to match its step.
    beta_1 = float(np.float32(_hyperparameter(optimizer, "beta_1")))
    beta_2 = float(np.float32(_hyperparameter(optimizer, "beta_2")))
    slot = "velocity_hat" if optimizer.amsgrad else "velocity"
    scale = (1.0 - beta_1**t) / np.sqrt(1.0 - beta_2**t)
    return [
        scale * (np.sqrt(_slot(optimizer, v, slot)) + epsilon)
        for v in variables
    ]


def threshold(optimizer: Any, learning_rate: float | None = None) -> float:
    """The preconditioned-sharpness threshold of the optimizer's step:
    `(2 + 2 beta_1) / (eta (1 - beta_1))` for Adam/AdamW, `2 (1 +
    momentum) / eta` for RMSprop.

    Args:
        optimizer: Adam, AdamW or RMSprop.
        learning_rate: eta; None reads the optimizer's (schedules too).
    """
    optimizer = unwrap(optimizer)
    eta = (
        _hyperparameter(optimizer, "learning_rate")
        if learning_rate is None
        else float(learning_rate)
    )
    if not eta > 0:
        raise ArgumentError(f"The learning rate is {eta}; need > 0.")
    kind = optimizer_kind(optimizer)
    if kind == "adam":
        return stability.adam_threshold(
            eta, _hyperparameter(optimizer, "beta_1")
        )
    if kind == "rmsprop":
        return stability.momentum_threshold(eta, float(optimizer.momentum))
    raise ArgumentError(
        f"{type(optimizer).__name__} has no preconditioned threshold; use "
        "Adam, AdamW or RMSprop."
    )


class PreconditionedOperator:
    """`P^{-1/2} H P^{-1/2}` for a `HessianOperator` H and a diagonal P.

    A linear operator for the solvers of `tf_breakeven.spectrum`. The
    scaling d = P^{-1/2} is an input of the compiled solvers, like the
    probe batches, so measurements at new P share one trace.

    Args:
        operator: the Hessian operator.
        diagonal: P shaped like the trainable variables (or a flat
            vector), positive.
    """

    def __init__(self, operator: HessianOperator, diagonal: Any):
        self.operator = operator
        if diagonal is None:
            self.scale = None
        else:
            if isinstance(diagonal, (list, tuple)):
                diagonal = np.concatenate(
                    [np.ravel(np.asarray(p, np.float64)) for p in diagonal]
                )
            self.scale = tf.cast(
                tf.math.rsqrt(tf.constant(diagonal, tf.float64)),
                operator.dtype,
            )

    @property
    def dim(self) -> int:
        return self.operator.dim

    @property
    def dtype(self) -> tf.DType:
        return self.operator.dtype

    @property
    def shapes(self) -> list[tf.TensorShape]:
        return self.operator.shapes

    @property
    def jit_compile(self) -> bool:
        return self.operator.jit_compile

    def flat_matvec(self, vector: tf.Tensor) -> tf.Tensor:
        """d * H (d * v) on a flat vector."""
        return self.scale * self.operator.flat_matvec(self.scale * vector)

    def solver_inputs(self) -> tuple[HessianKernel, tuple, Any]:
        kernel, key, batches = self.operator.solver_inputs()
        return kernel, key + ("preconditioned",), (batches, self.scale)

    def with_inputs(self, inputs: Any) -> PreconditionedOperator:
        batches, scale = (None, None) if inputs is None else inputs
        bound = PreconditionedOperator(self.operator.with_inputs(batches), None)
        bound.scale = scale
        return bound


def preconditioned_hessian_eigenpairs(
    model: keras.Model,
    data: Any,
    optimizer: Any = None,
    k: int = 1,
    *,
    num_iterations: int | None = None,
    tol: float = spectrum.DEFAULT_TOL,
    seed: int = 0,
    start_vector: Sequence[Any] | None = None,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
    jit_compile: bool = False,
) -> spectrum.Eigenpairs:
    """Top k eigenpairs of `P^{-1/2} H P^{-1/2}` (Lanczos, as
    `hessian_eigenpairs`), P from the optimizer's current slots.

    Args:
        model, data: the model and the probe set of its Hessian H.
        optimizer: Adam, AdamW or RMSprop; None for `model.optimizer`.
        k, num_iterations, tol, seed, start_vector: see
            `spectrum.eigenpairs` (the eigenvectors live in the
            preconditioned coordinates, `u = P^{1/2} e`).
        loss, training, include_regularization, method, jit_compile: see
            `HessianOperator`.

    Raises:
        ValueError: no, or no adaptive, optimizer; no step taken; bad data.
    """
    diagonal = preconditioner(model, optimizer)
    operator = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=method,
        jit_compile=jit_compile,
    )
    return spectrum.eigenpairs(
        PreconditionedOperator(operator, diagonal),
        k,
        num_iterations=num_iterations,
        tol=tol,
        seed=seed,
        start_vector=start_vector,
    )


def preconditioned_hessian_eigenvalues(
    model: keras.Model,
    data: Any,
    optimizer: Any = None,
    k: int = 1,
    **kwargs: Any,
) -> np.ndarray:
    """Top k eigenvalues of `P^{-1/2} H P^{-1/2}`, float64 [k], descending;
    the first is the preconditioned sharpness. Arguments: see
    `preconditioned_hessian_eigenpairs`."""
    return preconditioned_hessian_eigenpairs(
        model, data, optimizer, k, **kwargs
    ).eigenvalues
