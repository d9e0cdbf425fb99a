"""Curvature along gradients: batch sharpness and gradient-Hessian alignment.

* Batch sharpness (Andreyev & Beneventano 2024, "Edge of Stochastic
  Stability"): the mean over mini-batches B of `g_B^T H_B g_B / ||g_B||^2`,
  with g_B and H_B the gradient and Hessian of the mean loss on B. Under
  mini-batch SGD it is this quantity, not lambda_1 of the full Hessian,
  that settles at 2 / eta.
* Gradient curvature `g^T H g / ||g||^2` (the curvature along the probe
  gradient) and the fraction `sum_j (u_j^T g)^2 / ||g||^2` of the squared
  gradient norm inside the top-k Hessian eigenspace (Gur-Ari et al. 2018,
  "Gradient Descent Happens in a Tiny Subspace").

A zero gradient gives NaN (0 / 0), never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from tf_breakeven import linalg, spectrum
from tf_breakeven.functional import (
    LossLike,
    check_vector,
    num_examples,
    rebatch,
)
from tf_breakeven.hessian import HessianOperator
from tf_breakeven.validation import ArgumentError, check_int

CURVATURE_KEY = "hessian/gradient_curvature"
IN_TOP_K_KEY = "hessian/gradient_in_top_k"


def sharpness_batches(operator: HessianOperator, batch_size: int) -> list:
    """The probe of `operator` as consecutive batches of `batch_size`
    (examples beyond the last whole batch are left out).

    Raises:
        ValueError: `batch_size` < 1 or larger than the probe.
    """
    total = num_examples(operator.batches)
    batch_size = check_int(
        "batch_size",
        batch_size,
        1,
        hint="the mini-batch size S of the SGD run",
    )
    if batch_size > total:
        raise ArgumentError(
            f"batch_size={batch_size} is larger than the {total} probe "
            "examples; batch sharpness needs at least one whole mini-batch: "
            "pass a larger probe or a smaller batch_size."
        )
    return rebatch(operator.batches, batch_size, drop_remainder=True)


def probe_batch_sharpness(operator: HessianOperator, batches: list) -> float:
    """Mean of `g_B^T H_B g_B / ||g_B||^2` over `batches`, in `operator`'s
    model configuration; one double-backward pass per batch."""
    total = operator.with_inputs(batches).sum_over_batches(
        operator.kernel.self_curvature, ()
    )
    return float(total) / len(batches)


def batch_sharpness(
    model: keras.Model,
    data: Any,
    batch_size: int,
    *,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    jit_compile: bool = False,
) -> float:
    """Batch sharpness over consecutive mini-batches of `batch_size`.

    Args:
        model: a built Keras model.
        data: the probe, `(x, y[, sample_weight])` or a finite
            `tf.data.Dataset`; its examples are regrouped into
            `num_examples // batch_size` consecutive mini-batches.
        batch_size: S, the mini-batch size of the run.
        loss, training, include_regularization, jit_compile: see
            `HessianOperator`.

    Returns:
        A float; NaN when a mini-batch gradient is zero or non-finite.
    """
    operator = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        jit_compile=jit_compile,
    )
    return probe_batch_sharpness(
        operator, sharpness_batches(operator, batch_size)
    )


def alignment(
    operator: HessianOperator, eigenvectors: Sequence[Sequence[Any]]
) -> dict[str, float]:
    """`hessian/gradient_curvature` and `hessian/gradient_in_top_k` of the
    probe gradient, for orthonormal `eigenvectors` of `operator` (each
    shaped like the trainable variables)."""
    eigenvectors = [
        check_vector(u, operator.shapes, operator.dtype) for u in eigenvectors
    ]
    if not eigenvectors:
        raise ArgumentError("Pass at least one eigenvector.")
    gradient = operator.gradient()
    product = operator.matvec(gradient)
    g = _flat64(gradient)
    squared = np.float64(g @ g)  # numpy: 0 / 0 is NaN, not an exception
    basis = np.stack([_flat64(u) for u in eigenvectors])
    with np.errstate(divide="ignore", invalid="ignore"):
        curvature = float(g @ _flat64(product)) / squared
        inside = float(np.sum((basis @ g) ** 2)) / squared
    return {CURVATURE_KEY: float(curvature), IN_TOP_K_KEY: float(inside)}


def _flat64(tensors: Sequence[Any]) -> np.ndarray:
    return np.asarray(linalg.flatten_tensors(list(tensors)), np.float64)


def gradient_alignment(
    model: keras.Model,
    data: Any,
    k: int = 1,
    *,
    eigenvectors: Sequence[Sequence[Any]] | None = None,
    tol: float = spectrum.DEFAULT_TOL,
    seed: int = 0,
    loss: LossLike = None,
    training: bool = True,
    include_regularization: bool = True,
    method: str = "auto",
    jit_compile: bool = False,
) -> dict[str, float]:
    """Curvature along the probe gradient and its share in the top-k
    Hessian eigenspace.

    Args:
        model, data: the model and the probe set (g and H of its mean loss).
        k: the dimension of the top eigenspace.
        eigenvectors: the top-k eigenvectors if already computed (e.g.
            `hessian_eigenpairs(...).eigenvectors`); else Lanczos with
            `tol` and `seed` computes them.
        loss, training, include_regularization, method, jit_compile: see
            `HessianOperator`.

    Returns:
        `{"hessian/gradient_curvature": g^T H g / ||g||^2,
        "hessian/gradient_in_top_k": ||P_k g||^2 / ||g||^2}`; NaN for a
        zero gradient.
    """
    operator = HessianOperator(
        model,
        data,
        loss=loss,
        training=training,
        include_regularization=include_regularization,
        method=method,
        jit_compile=jit_compile,
    )
    if eigenvectors is None:
        k = check_int("k", k, 1)
        eigenvectors = spectrum.eigenpairs(
            operator, k, tol=tol, seed=seed
        ).eigenvectors
    return alignment(operator, eigenvectors)
