"""The probe-operator base: a model function over a probe set.

Hessian operators (`tf_breakeven.hessian`), directional curvature
(`tf_breakeven.curvature`) and sample-gradient rows (`tf_breakeven.gradients`)
all pair per-batch derivative functions of one model configuration (a
*kernel*) with a probe set. This module holds what they share:

* `cached_kernel`: one cache of kernels per model and configuration, so
  every operator on the same model reuses the same `tf.function`s, which
  are traced once per batch shape, never once per call;
* `ProbeOperator`: the probe batches, their validation against the model,
  the dimension, dtype and shapes of the parameters, and the dispatch of
  per-batch work to the replicas of the model's strategy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_breakeven import linalg
from tf_breakeven.distribute import replica_strategy, sum_over_batches
from tf_breakeven.functional import (
    Batch,
    LossLike,
    ModelFunction,
    num_examples,
    probe_batches,
)
from tf_breakeven.validation import ArgumentError

_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loss_key(loss: LossLike) -> Any:
    """A hashable stand-in for a loss: its name, or the object's id."""
    return id(loss) if loss is not None and not isinstance(loss, str) else loss


def cached_kernel(
    model: keras.Model, key: tuple, build: Callable[[], Any]
) -> Any:
    """The kernel of `model` under `key`, built by `build()` the first time.

    Kernels live as long as their model (the cache holds it weakly).
    `key` must say everything the kernel depends on besides the model,
    starting with the kernel's kind (e.g. `("hessian", loss_key(loss),
    training, ...)`).
    """
    per_model = _KERNELS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = build()
    return per_model[key]


class Kernel:
    """Base of the per-batch derivative functions of one configuration.

    Attributes:
        function: the model and loss as a pure function.
        losses: `tf.function` `(x, y, sample_weight) -> per-example
            losses` at the model's current variables (used to check that a
            probe fits the model).
    """

    def __init__(self, function: ModelFunction):
        self.function = function
        self.losses = tf.function(self._losses)

    def _losses(self, x, y, sample_weight):
        fn = self.function
        return fn.per_example_losses(
            fn.read_parameters(), fn.read_state(), x, y, sample_weight
        )


def batch_signature(batch: Batch) -> tuple:
    """Shapes and dtypes of a batch: one trace per distinct signature."""

    def spec(t):
        return (tuple(t.shape), t.dtype)

    return (
        tuple(spec(t) for t in tf.nest.flatten(batch.x)),
        tuple(spec(t) for t in tf.nest.flatten(batch.y)),
        None if batch.sample_weight is None else spec(batch.sample_weight),
    )


def check_fits(losses: Callable[..., Any], batches: Sequence[Batch]) -> None:
    """Traces `losses(x, y, sample_weight)` once per batch signature.

    Raises:
        ValueError: with the fix, when a batch does not fit the model or
            the loss.
    """
    seen = set()
    for batch in batches:
        signature = batch_signature(batch)
        if signature in seen:
            continue
        seen.add(signature)
        try:
            losses(*batch)
        except (ValueError, TypeError, tf.errors.OpError) as error:
            # Errors raised while tracing carry the traced frames; the last
            # line is the error itself.
            lines = str(error).strip().splitlines() or [""]
            detail = lines[-1] if "in user code" in lines[0] else str(error)
            raise ArgumentError(
                "The probe data does not fit the model or the loss "
                f"(batch signature {signature}): {detail}. Pass inputs "
                "shaped like the model's inputs and targets the loss "
                "accepts."
            ) from error


class ProbeOperator:
    """A model function evaluated over every batch of a probe set.

    Subclasses add the operator itself (e.g. `matvec`); this base holds
    the probe batches, the parameter layout and the replica dispatch.

    Args:
        function: the model and loss as a pure function.
        data: `(x, y)`, `(x, y, sample_weight)`, or a finite
            `tf.data.Dataset` of such batches.
        losses: a `tf.function` `(x, y, sample_weight) -> per-example
            losses` traced once per batch signature to check that every
            batch fits, or None when the subclass checks its own inputs.
        jit_compile: whether the operator's functions compile with XLA;
            compiled operators run on the default device (no replica
            dispatch), as a TPU program must.
    """

    def __init__(
        self,
        function: ModelFunction,
        data: Any,
        losses: Callable[..., Any] | None,
        *,
        jit_compile: bool = False,
    ):
        self.function = function
        self.batches = probe_batches(data)
        self.num_examples = num_examples(self.batches)
        self.jit_compile = bool(jit_compile)
        if losses is not None:
            check_fits(
                lambda *batch: losses.get_concrete_function(*batch),
                self.batches,
            )

    @property
    def strategy(self) -> tf.distribute.Strategy | None:
        """The multi-replica strategy work is dealt out to, or None."""
        if self.jit_compile:
            return None
        return replica_strategy(self.function.model)

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

    def sum_over_batches(self, fn: Callable[..., Any], shared: tuple) -> Any:
        """Sum over probe batches of `fn(*shared, x, y, sample_weight)`.

        Under a multi-replica strategy each replica takes a batch at a time
        and the results are summed (`tf_breakeven.distribute`).
        """
        return sum_over_batches(self.strategy, fn, shared, self.batches)

    def to_flat(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        """Tensors shaped like the trainable variables as one vector."""
        return linalg.flatten_tensors(tensors)

    def from_flat(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """A flat vector of length `dim` as tensors shaped like the
        trainable variables."""
        return linalg.unflatten_tensors(vector, self.shapes)
