"""A Keras model and a loss as pure functions of parameter tensors.

Everything that differentiates a model twice goes through this module. It
builds on `keras.Model.stateless_call`, which takes the values of the
trainable and non-trainable variables as arguments and returns the updated
non-trainable values instead of assigning them, so a measurement never
changes the model: moving statistics, the dropout seed state and every
variable stay bitwise as they were.

Two conventions hold everywhere in the library:

* `training=True` (the default) is the function SGD optimizes: batch
  statistics in BatchNormalization, dropout active. Dropout masks come from
  the model's seed-generator state *as it is when the measurement starts*;
  the same state is passed to every call of one measurement, so all
  Hessian-vector products of a solver see the same masks (a fixed operator).
  `training=False` is inference mode (moving statistics, no dropout).
* The loss is the weighted mean of per-example losses, as Keras'
  `sum_over_batch_size` reduction computes it: `mean_i(w_i * l_i)`, plus the
  model's regularization losses (switchable). Over a probe set of several
  batches it is the mean over all examples, each batch being run as one
  batch through the model.

Second derivatives through normalization layers: TensorFlow's
`tf.nn.moments` computes the variance around `stop_gradient(mean)`, which is
exact to first order but drops a second-order term (docs/pitfalls.md#P1:
41-71% HVP error on a ResNet with BatchNormalization). Every function traced
here runs
under `exact_moments()`, which swaps the moments used by Keras'
BatchNormalization, LayerNormalization and GroupNormalization for a plain
`mean((x - mean)**2)` with identical forward values.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from absl import logging
from keras.src.backend.tensorflow import nn as _keras_tf_nn
from keras.src.backend.tensorflow import numpy as _keras_tf_numpy

from tf_breakeven.validation import ArgumentError

LossLike = str | keras.losses.Loss | Callable[..., Any] | None

_LOG_STATE = threading.local()


@contextlib.contextmanager
def one_log_line() -> Iterator[None]:
    """Holds back the measurements' own warnings (`measurement_warning`).

    A caller that logs one line for a whole measurement (the callbacks'
    NaN policy, `callbacks.base.compute_or_nan`) runs the measurement in
    this context, so a NaN probe gives exactly one log line, not one per
    solver call.
    """
    depth = getattr(_LOG_STATE, "depth", 0)
    _LOG_STATE.depth = depth + 1
    try:
        yield
    finally:
        _LOG_STATE.depth = depth


def measurement_warning(message: str, *args: Any) -> None:
    """`logging.warning` unless inside `one_log_line()`."""
    if not getattr(_LOG_STATE, "depth", 0):
        logging.warning(message, *args)


def _exact_compute_moments(x, axes, keepdims):
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(
        tf.math.squared_difference(x, mean), axis=axes, keepdims=True
    )
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


@contextlib.contextmanager
def _swapped(module: Any, name: str, replacement: Callable) -> Iterator[None]:
    original = getattr(module, name, None)
    if original is None:
        raise RuntimeError(
            f"tf_breakeven replaces {module.__name__}.{name} while it traces "
            "its functions (see tf_breakeven.functional), and this Keras "
            f"version ({keras.__version__}) no longer has it. Pin "
            "keras<=3.15 or update tf_breakeven.functional."
        )
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def exact_moments() -> contextlib.AbstractContextManager:
    """Makes Keras normalization layers twice differentiable exactly.

    Within the context, Keras' TensorFlow backend computes moments without
    `stop_gradient`, so Hessians through BatchNormalization (training mode),
    LayerNormalization and GroupNormalization are exact. Forward values are
    unchanged. The swap only matters while a function is traced, which is
    when the Python body runs.

    Raises:
        RuntimeError: if the Keras internals this relies on have moved (a
            Keras upgrade); silently wrong Hessians are worse than an error.
    """
    return _swapped(_keras_tf_nn, "_compute_moments", _exact_compute_moments)


_keras_einsum = _keras_tf_numpy.einsum


def _plain_einsum(subscripts, *operands, **kwargs):
    operands = [tf.convert_to_tensor(o) for o in operands]
    if kwargs or not all(o.dtype.is_floating for o in operands):
        return _keras_einsum(subscripts, *operands, **kwargs)
    return tf.einsum(subscripts, *operands)


def pfor_safe_einsum() -> contextlib.AbstractContextManager:
    """Routes Keras' `ops.einsum` to `tf.einsum` for floating operands.

    Keras' TensorFlow backend lowers common einsum patterns to `tf.matmul`;
    inside `tf.vectorized_map` with oneDNN on (the default on x86 CPUs)
    those matmuls corrupt the heap (`free(): invalid next size`;
    docs/pitfalls.md#P12, reproduced on a one-layer keras-hub BERT). A plain
    `tf.einsum` computes the same product and vectorizes cleanly, so per-sample
    gradients work without the user setting `TF_ENABLE_ONEDNN_OPTS=0`.
    """
    return _swapped(_keras_tf_numpy, "einsum", _plain_einsum)


class Batch(NamedTuple):
    """One batch of a probe set; `sample_weight` is None or shape [B]."""

    x: Any
    y: Any
    sample_weight: tf.Tensor | None


def _batch_size(x: Any) -> int:
    first = tf.nest.flatten(x)[0]
    size = first.shape[0]
    if size is None:
        raise ArgumentError(
            "Probe batches need a static batch dimension; materialize the "
            "data (e.g. `dataset.take(n).cache()`) or pass arrays."
        )
    return int(size)


def _to_batch(element: Any, where: str) -> Batch:
    if not isinstance(element, (tuple, list)) or len(element) not in (2, 3):
        raise ArgumentError(
            f"{where} must be a tuple `(x, y)` or `(x, y, sample_weight)`; "
            f"got {type(element).__name__}"
            + (
                f" of length {len(element)}"
                if hasattr(element, "__len__")
                else ""
            )
            + ". Map your dataset to such tuples."
        )
    x, y = element[0], element[1]
    weight = element[2] if len(element) == 3 else None
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    size = _batch_size(x)
    for part, name in ((y, "y"),) + (
        ((weight, "sample_weight"),) if weight is not None else ()
    ):
        for t in tf.nest.flatten(part):
            t = tf.convert_to_tensor(t)
            if t.shape.rank == 0 or t.shape[0] != size:
                raise ArgumentError(
                    f"{where}: `{name}` has shape {t.shape} but `x` has "
                    f"{size} examples; pass one {name} entry per example."
                )
    if weight is not None:
        weight = tf.convert_to_tensor(weight)
        if weight.shape.rank != 1:
            raise ArgumentError(
                f"{where}: `sample_weight` must have shape [batch], got "
                f"{weight.shape}."
            )
    return Batch(x, y, weight)


def probe_batches(data: Any) -> list[Batch]:
    """Normalizes probe data into a list of batches of tensors.

    Args:
        data: a tuple `(x, y)` or `(x, y, sample_weight)` of arrays or
            tensors (one batch), or a finite `tf.data.Dataset` of such
            batches (iterated once and kept in memory: probe sets are small
            by design, e.g. 5% of the training set).

    Returns:
        The batches, each with tensors and a static batch size.

    Raises:
        ValueError: for an empty probe set, an infinite dataset, or elements
            that are not `(x, y[, sample_weight])` tuples.
    """
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ArgumentError(
                "The probe dataset is infinite (e.g. it ends in `.repeat()`);"
                " pass a finite one, e.g. `dataset.take(num_batches)`."
            )
        batches = [
            _to_batch(element, f"Element {i} of the probe dataset")
            for i, element in enumerate(data)
        ]
    else:
        batches = [_to_batch(data, "Probe data")]
    batches = [b for b in batches if _batch_size(b.x) > 0]
    if not batches:
        raise ArgumentError(
            "The probe data is empty; pass at least one example."
        )
    return batches


def num_examples(batches: Sequence[Batch]) -> int:
    """Total number of examples in a list of probe batches."""
    return sum(_batch_size(b.x) for b in batches)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """The probe batches joined into one batch, in order.

    Sample weights are kept when any batch has them (1 for the batches
    without); float64 weights stay float64 (a float32 cast would round them
    for float64 models); the loss casts them to the model's dtype.
    """

    def cat(*parts):
        return tf.concat(parts, axis=0)

    x = tf.nest.map_structure(cat, *[b.x for b in batches])
    y = tf.nest.map_structure(cat, *[b.y for b in batches])
    weights = [b.sample_weight for b in batches]
    if all(w is None for w in weights):
        return Batch(x, y, None)
    wide = any(w is not None and w.dtype == tf.float64 for w in weights)
    dtype = tf.float64 if wide else tf.float32
    weight = tf.concat(
        [
            tf.ones([_batch_size(b.x)], dtype)
            if w is None
            else tf.cast(w, dtype)
            for b, w in zip(batches, weights)
        ],
        axis=0,
    )
    return Batch(x, y, weight)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples `[start, stop)` of a batch."""

    def cut(t):
        return t[start:stop]

    return Batch(
        tf.nest.map_structure(cut, batch.x),
        tf.nest.map_structure(cut, batch.y),
        None if batch.sample_weight is None else cut(batch.sample_weight),
    )


def rebatch(
    batches: Sequence[Batch],
    batch_size: int,
    *,
    start: int = 0,
    stop: int | None = None,
    drop_remainder: bool = False,
) -> list[Batch]:
    """Examples `[start, stop)` of the probe, in consecutive batches of
    `batch_size` (the last one smaller unless `drop_remainder`)."""
    joined = concat_batches(batches)
    stop = _batch_size(joined.x) if stop is None else stop
    ends = list(range(start, stop, batch_size))
    return [
        slice_batch(joined, a, min(a + batch_size, stop))
        for a in ends
        if not drop_remainder or a + batch_size <= stop
    ]


def _per_example_loss_fn(model: keras.Model, loss: LossLike) -> Callable:
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ArgumentError(
                "The model has no loss: compile it (`model.compile(loss=...)`)"
                " or pass `loss=` (a Keras loss, its name, or a callable "
                "`fn(y_true, y_pred)` returning per-example losses)."
            )
        if isinstance(loss, (dict, list, tuple)):
            # Keras keeps no public record of the compiled `loss_weights`,
            # so the sum Keras minimizes cannot be rebuilt faithfully.
            raise ArgumentError(
                "The model was compiled with one loss per output; pass "
                "`loss=fn(y_true, y_pred)` returning per-example losses of "
                "the whole model (e.g. the weighted sum over outputs of each "
                "output's per-example loss; y_true and y_pred come "
                "structured like the targets and the outputs)."
            )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # `call` is the unreduced per-sample loss; `__call__` would reduce.
        return loss.call
    if callable(loss):
        return loss
    raise ArgumentError(
        f"`loss` must be a Keras loss, its name or a callable; got {loss!r}."
    )


# Keras losses that take one-hot labels, and those that take class indices.
_ONE_HOT_LOSSES = (
    "categorical_crossentropy",
    "categorical_focal_crossentropy",
    "categorical_hinge",
)
_INDEX_LOSSES = ("sparse_categorical_crossentropy",)


def _loss_name(loss: Callable) -> str:
    """The Keras loss function's name behind `loss` ("" if unknown)."""
    owner = getattr(loss, "__self__", loss)  # `Loss.call` -> the Loss
    return str(getattr(getattr(owner, "fn", owner), "__name__", ""))


def check_labels(name: str, y: Any, y_pred: Any) -> None:
    """Refuses class indices for a one-hot loss and one-hot labels for a
    sparse one (static shapes; Keras would fail deep in a graph, or
    broadcast silently). A `ValueError`, as it is raised while tracing
    (autograph keeps only built-in error types, docs/pitfalls.md#P26); the
    probe checks turn it into an `ArgumentError`."""
    if not (isinstance(y, tf.Tensor) and isinstance(y_pred, tf.Tensor)):
        return
    labels, outputs = y.shape, y_pred.shape
    if labels.rank is None or outputs.rank is None or outputs.rank < 2:
        return
    classes = outputs[-1]
    indices = labels.rank == outputs.rank - 1 or (
        labels.rank == outputs.rank and labels[-1] == 1
    )
    if name in _ONE_HOT_LOSSES and indices and classes != 1:
        raise ValueError(
            f"`{name}` takes one-hot labels shaped like the outputs "
            f"{outputs}, but the labels have shape {labels} (class "
            "indices). Pass one-hot labels (`keras.utils.to_categorical(y, "
            f"{classes})`) or use `sparse_categorical_crossentropy`."
        )
    if name in _INDEX_LOSSES and labels.rank == outputs.rank and not indices:
        raise ValueError(
            f"`{name}` takes class indices (shape {outputs[:-1]}), but the "
            f"labels have shape {labels} (one-hot). Pass "
            "`np.argmax(y, axis=-1)` or use `categorical_crossentropy`."
        )


def _sublayers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    # Keras has no public recursive layer iterator; `_flatten_layers` is the
    # one its own summary and saving use.
    return model._flatten_layers(include_self=False)


def has_batch_norm(model: keras.Model) -> bool:
    """Whether a BatchNormalization layer couples the examples of a batch."""
    return any(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in _sublayers(model)
    )


def _uses_unrolled_recurrence_only(model: keras.Model) -> bool:
    for layer in _sublayers(model):
        if isinstance(layer, keras.layers.RNN) and not layer.unroll:
            return False
    return True


def rolled_recurrent_variables(model: keras.Model) -> set[int]:
    """`id`s of the variables of recurrent layers that run a
    `tf.while_loop` (`unroll=False`): their ops run inside the loop body."""
    return {
        id(v)
        for layer in _sublayers(model)
        if isinstance(layer, keras.layers.RNN) and not layer.unroll
        for v in layer.trainable_variables
    }


class ModelFunction:
    """A Keras model and a loss as pure functions of parameter tensors.

    This class is long because the losses with and without the
    regularization (the ghost engine needs them apart) share one body.

    Attributes:
        loss: the loss as given (None: the model's compiled loss).
        training: whether the model runs in training mode.
        include_regularization: whether `model.losses` are added.
        dtype: the dtype losses and derivatives are computed in.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: LossLike = None,
        *,
        training: bool = True,
        include_regularization: bool = True,
    ):
        if not isinstance(model, keras.Model):
            raise ArgumentError(
                f"Expected a keras.Model, got {type(model).__name__}."
            )
        if not model.built:
            raise ArgumentError(
                "The model is not built; call it on a batch or build it "
                "with `model.build(input_shape)` first."
            )
        if not model.trainable_variables:
            raise ArgumentError("The model has no trainable variables.")
        self._model_ref = weakref.ref(model)
        self.loss = loss
        self.training = bool(training)
        self.include_regularization = bool(include_regularization)
        self._loss = _per_example_loss_fn(model, loss)
        self._loss_name = _loss_name(self._loss)
        dtypes = {v.dtype for v in model.trainable_variables}
        self.dtype = tf.float64 if "float64" in dtypes else tf.float32

    @property
    def model(self) -> keras.Model:
        """The wrapped model (held weakly so caches keyed on it can die)."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("The model of this function was deleted.")
        return model

    @property
    def variables(self) -> list:
        return list(self.model.trainable_variables)

    @property
    def shapes(self) -> list[tf.TensorShape]:
        return [tf.TensorShape(v.shape) for v in self.model.trainable_variables]

    @property
    def dim(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def has_rolled_recurrence(self) -> bool:
        """True if a recurrent layer runs a `tf.while_loop` (unroll=False)."""
        return not _uses_unrolled_recurrence_only(self.model)

    def read_parameters(self) -> list[tf.Tensor]:
        """The current trainable values as tensors (safe for autodiff)."""
        return [
            tf.convert_to_tensor(v.value)
            for v in self.model.trainable_variables
        ]

    def primal_parameters(self) -> list[tf.Tensor]:
        """`read_parameters` in `dtype`: derivatives of a float16 or
        bfloat16 model are taken in float32 (the model still computes in
        its own dtypes, `per_example_losses` casts back)."""
        return [tf.cast(p, self.dtype) for p in self.read_parameters()]

    def _upcast(self, t: Any) -> Any:
        # Keras' `Loss.__call__` computes a mixed-precision model's loss in
        # float32; `Loss.call`, used here unreduced, would not
        # (docs/pitfalls.md#P25).
        if t.dtype.is_floating and t.dtype.size < self.dtype.size:
            return tf.cast(t, self.dtype)
        return t

    def read_state(self) -> list[tf.Tensor]:
        """The current non-trainable values (moving stats, seed states)."""
        return [
            tf.convert_to_tensor(v.value)
            for v in self.model.non_trainable_variables
        ]

    def per_example_losses(
        self,
        params: Sequence[tf.Tensor],
        state: Sequence[tf.Tensor],
        x: Any,
        y: Any,
        sample_weight: tf.Tensor | None = None,
        *,
        return_outputs: bool = False,
    ) -> tf.Tensor | tuple[tf.Tensor, Any]:
        """Weighted per-example losses `w_i * l_i (+ regularization)`, [B].

        The whole batch runs through the model at once (batch statistics
        of BatchNormalization couple the examples in training mode). With
        `return_outputs`, returns `(losses, y_pred)`.
        """
        losses, regularization, y_pred = self.losses_and_regularization(
            params, state, x, y, sample_weight
        )
        if regularization is not None:
            losses = losses + regularization
        return (losses, y_pred) if return_outputs else losses

    def losses_and_regularization(
        self,
        params: Sequence[tf.Tensor],
        state: Sequence[tf.Tensor],
        x: Any,
        y: Any,
        sample_weight: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor | None, Any]:
        """`(w_i * l_i [B], regularization or None, y_pred)`.

        `per_example_losses` without the regularization added: the sum of
        the model's regularization losses (None when there are none or
        `include_regularization` is off), a scalar.
        """
        variables = self.model.trainable_variables
        params = [tf.cast(p, v.dtype) for p, v in zip(params, variables)]
        with exact_moments():
            y_pred, _, reg_losses = self.model.stateless_call(
                params,
                list(state),
                x,
                training=self.training,
                return_losses=True,
            )
            outputs = tf.nest.map_structure(self._upcast, y_pred)
            check_labels(self._loss_name, y, outputs)
            losses = self._loss(y, outputs)
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        losses = tf.cast(losses, self.dtype)
        if losses.shape.rank == 0:
            # A callable that already reduced: spread its mean evenly.
            losses = tf.fill([batch], losses)
        elif losses.shape.rank > 1:
            losses = tf.reduce_mean(
                losses, axis=list(range(1, losses.shape.rank))
            )
        if sample_weight is not None:
            losses = losses * tf.cast(sample_weight, self.dtype)
        regularization = None
        if self.include_regularization and reg_losses:
            regularization = tf.cast(tf.add_n(reg_losses), self.dtype)
        return losses, regularization, y_pred

    def loss_sum(
        self,
        params: Sequence[tf.Tensor],
        state: Sequence[tf.Tensor],
        batch: Batch,
    ) -> tf.Tensor:
        """Sum over the batch of the weighted per-example losses."""
        return tf.reduce_sum(self.per_example_losses(params, state, *batch))


def dense(gradient: Any, like: tf.Tensor | None = None) -> tf.Tensor:
    """Densifies a gradient or tangent (IndexedSlices from Embedding)."""
    if gradient is None:
        if like is None:
            raise ArgumentError("Cannot densify None without a reference.")
        return tf.zeros_like(like)
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def check_vector(
    vector: Sequence[Any], shapes: Sequence[tf.TensorShape], dtype: tf.DType
) -> list[tf.Tensor]:
    """Validates a vector structured like the trainable variables."""
    if isinstance(vector, (tf.Tensor, tf.Variable)) or not isinstance(
        vector, (list, tuple)
    ):
        raise ArgumentError(
            "`vector` must be a list of tensors shaped like "
            "`model.trainable_variables` "
            f"({len(shapes)} tensors); got {type(vector).__name__}. Use "
            "`tf_breakeven.linalg.unflatten_tensors` for a flat vector."
        )
    if len(vector) != len(shapes):
        raise ArgumentError(
            f"`vector` has {len(vector)} tensors but the model has "
            f"{len(shapes)} trainable variables; pass one tensor per "
            "variable, in `model.trainable_variables` order."
        )
    out = []
    for i, (v, shape) in enumerate(zip(vector, shapes)):
        v = tf.convert_to_tensor(v, dtype_hint=dtype)
        if v.dtype != dtype and v.dtype.is_floating:
            v = tf.cast(v, dtype)  # e.g. a float16 model's own vector
        v = tf.convert_to_tensor(v, dtype=dtype)
        if v.shape != shape:
            raise ArgumentError(
                f"`vector[{i}]` has shape {v.shape} but trainable variable "
                f"{i} has shape {shape}."
            )
        out.append(v)
    return out
