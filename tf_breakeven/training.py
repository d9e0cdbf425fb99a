"""A Keras model whose `train_step` also measures per-step statistics.

`TrackingModel` is a `keras.Model` (subclass it, or build it functionally
with `TrackingModel(inputs, outputs, tracking=...)`; `track(model)` wraps an
existing functional or sequential model, sharing its layers and weights).
Its `train_step` is Keras' own, plus, on tracked steps:

* `grad/step_norm`: norm of the (all-reduced, global-batch) gradient of the
  update, from the same forward/backward pass;
* `grad/update_norm`: norm of the parameter change of the update;
* with `gram=True`: statistics of the current batch's sample gradients
  (micro-batches of `microbatch_size`), keys `batch/grad_cov/lambda_1`,
  `batch/grad_cov/trace`, `batch/grad_cov/trace_over_lambda_1`,
  `batch/confusion/eta`, `batch/confusion/cos_min`,
  `batch/confusion/cos_mean`, `batch/grad/norm`, `batch/grad/diversity`,
  `batch/grad/noise_scale` (definitions as in `tf_breakeven.statistics`).
  For models without state (no BatchNormalization, no dropout) and
  without loss scaling, a tracked step runs ONE vectorized
  forward/backward pass: the update uses the mean of the micro-batch
  gradients (the batch gradient, up to float roundoff). Models with state
  keep Keras' own update and compute the sample gradients in one extra
  vectorized pass through `stateless_call` (their micro-batch gradients
  use micro-batch statistics, which the batch update must not);
* with `hessian_every=n`: one warm-started power-iteration step on the
  current batch's Hessian every n steps, `hessian/lambda_1_running`.

Whether a step is tracked is a graph conditional on the optimizer's
iteration counter (`every`), so nothing retraces. Tracking never changes
the update beyond float roundoff: with the same seed, a TrackingModel
follows the trajectory of a plain `keras.Model` bitwise on CPU, except on
the fused Gram steps of stateless models, where it agrees to float32
roundoff (tested). Under a
`tf.distribute` strategy each replica computes its share; gradients are
all-reduced for the norm, sample gradients all-gathered for the Gram
statistics, and Hessian-vector products averaged, so every replica holds
the same estimate.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from tf_breakeven import gradients as gradients_lib
from tf_breakeven import hessian as hessian_lib
from tf_breakeven.functional import Batch, pfor_safe_einsum

GRAM_KEYS = (
    "batch/grad_cov/lambda_1",
    "batch/grad_cov/trace",
    "batch/grad_cov/trace_over_lambda_1",
    "batch/confusion/eta",
    "batch/confusion/cos_min",
    "batch/confusion/cos_mean",
    "batch/grad/norm",
    "batch/grad/diversity",
    "batch/grad/noise_scale",
)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """What `TrackingModel.train_step` measures.

    Attributes:
        every: track every `every` optimizer steps (step 0, every, ...).
        gram: measure the Gram statistics of the batch's sample gradients.
        microbatch_size: M for the sample gradients (must divide the batch;
            a partial last batch uses its first multiple of M examples).
        hessian_every: one power-iteration HVP every n steps (0: off).
    """

    every: int = 1
    gram: bool = False
    microbatch_size: int = 1
    hessian_every: int = 0

    def __post_init__(self):
        for name in ("every", "microbatch_size"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < 1
            ):
                raise ValueError(
                    f"`{name}` must be an int >= 1; got {value!r}."
                )
        if self.hessian_every < 0:
            raise ValueError(
                f"`hessian_every` must be >= 0 (0 = off); got "
                f"{self.hessian_every}."
            )


def gram_statistics_tf(gram: tf.Tensor, microbatch_size: int) -> dict:
    """The `GRAM_KEYS` statistics of an [n, n] Gram matrix, in TF float64.

    Graph-friendly twin of `statistics.gram_statistics` for the keys above
    (tested against it); zero-norm samples are left out of the cosines.
    """
    gram = tf.cast(gram, tf.float64)
    n = tf.cast(tf.shape(gram)[0], tf.float64)
    centering = tf.eye(tf.shape(gram)[0], dtype=tf.float64) - 1.0 / n
    centered = centering @ gram @ centering / n
    eigenvalues = tf.linalg.eigvalsh((centered + tf.transpose(centered)) / 2)
    lambda_1 = tf.maximum(eigenvalues[-1], 0.0)
    trace = tf.linalg.trace(centered)
    mean_sq = tf.reduce_sum(gram) / n**2
    diagonal = tf.linalg.diag_part(gram)
    off = tf.logical_not(tf.eye(tf.shape(gram)[0], dtype=tf.bool))
    norms = tf.sqrt(tf.maximum(diagonal, 0.0))
    nonzero = norms > 1e-12 * tf.reduce_max(norms)
    pair = off & nonzero[:, None] & nonzero[None, :]
    cosines = tf.boolean_mask(
        gram / (norms[:, None] * norms[None, :] + 1e-300), pair
    )
    nan = tf.constant(math.nan, tf.float64)
    has_pairs = tf.size(cosines) > 0
    return {
        "batch/grad_cov/lambda_1": lambda_1,
        "batch/grad_cov/trace": trace,
        "batch/grad_cov/trace_over_lambda_1": trace / lambda_1,
        "batch/confusion/eta": -tf.reduce_min(tf.boolean_mask(gram, off)),
        "batch/confusion/cos_min": tf.where(
            has_pairs, tf.reduce_min(tf.concat([cosines, [2.0]], 0)), nan
        ),
        "batch/confusion/cos_mean": tf.where(
            has_pairs,
            tf.reduce_sum(cosines)
            / tf.maximum(tf.cast(tf.size(cosines), tf.float64), 1.0),
            nan,
        ),
        "batch/grad/norm": tf.sqrt(tf.maximum(mean_sq, 0.0)),
        "batch/grad/diversity": tf.linalg.trace(gram) / tf.reduce_sum(gram),
        "batch/grad/noise_scale": microbatch_size * trace / mean_sq,
    }


_NORM_KEYS = ("grad/step_norm", "grad/update_norm")
_HESSIAN_KEY = "hessian/lambda_1_running"


def _global_norm(tensors) -> tf.Tensor:
    return tf.sqrt(
        tf.add_n(
            [tf.reduce_sum(tf.square(tf.cast(t, tf.float64))) for t in tensors]
        )
    )


def _state_variable(initial, name: str) -> tf.Variable:
    # Identical on every replica: each replica assigns the same value.
    return tf.Variable(
        initial,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


@keras.saving.register_keras_serializable(package="tf_breakeven")
class TrackingModel(keras.Model):
    """`keras.Model` whose `train_step` also returns per-step statistics.

    Args:
        *args, **kwargs: those of `keras.Model` (functional or subclassed).
        tracking: a `TrackingConfig`, a dict of its fields, or None (no
            tracking: exactly Keras' train_step).
    """

    def __init__(self, *args, tracking=None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(tracking, dict):
            tracking = TrackingConfig(**tracking)
        self.tracking = tracking
        self._tracking_ready = False

    @property
    def tracking_keys(self) -> tuple[str, ...]:
        if self.tracking is None:
            return ()
        keys = _NORM_KEYS
        if self.tracking.gram:
            keys += GRAM_KEYS
        if self.tracking.hessian_every:
            keys += (_HESSIAN_KEY,)
        return keys

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self._tracking_ready = False

    def _prepare_tracking(self) -> None:
        """Creates state and checks the config; before the first trace."""
        if self._tracking_ready or self.tracking is None:
            return
        config = self.tracking
        if (
            config.gram
            and config.microbatch_size == 1
            and gradients_lib._has_batch_norm(self)
        ):
            raise ValueError(
                "TrackingConfig(gram=True) on a model with "
                "BatchNormalization needs microbatch_size >= 2 (one example "
                "has no batch statistics)."
            )
        with self.distribute_strategy.scope():
            self._tracked = _state_variable(
                tf.fill(
                    [len(self.tracking_keys)], tf.constant(math.nan, tf.float64)
                ),
                "tracked_values",
            )
            if config.hessian_every:
                dim = sum(math.prod(v.shape) for v in self.trainable_variables)
                start = tf.random.stateless_normal([dim], seed=[0, 0])
                dtype = self.trainable_variables[0].dtype
                self._hessian_vector = _state_variable(
                    tf.cast(start / tf.norm(start), dtype), "hessian_vector"
                )
        self._tracking_ready = True

    def fit(self, *args, **kwargs):
        self._prepare_tracking()
        return super().fit(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        if self.tracking is not None:
            config["tracking"] = dataclasses.asdict(self.tracking)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        tracking = config.pop("tracking", None)
        model = super().from_config(config, custom_objects=custom_objects)
        model.tracking = (
            None if tracking is None else TrackingConfig(**tracking)
        )
        return model

    def _fusable(self) -> bool:
        """Whether the update can come from the per-sample gradients.

        True for models without state (no BatchNormalization statistics,
        no dropout seeds) and without loss scaling: there the mean of the
        micro-batch gradients is the batch gradient, so tracked steps run
        one vectorized forward/backward pass for both.
        """
        return (
            self.tracking.gram
            and not self.non_trainable_variables
            and not isinstance(
                self.optimizer, keras.optimizers.LossScaleOptimizer
            )
        )

    def _keras_pass(self, x, y, sample_weight):
        # Keras' own forward/backward: the update of a plain model.
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.trainable_weights)
        # Keras divides the loss by the replica count; log it unscaled, as
        # its own train_step does (TRAPS.md 14).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return y_pred, loss * replicas, grads

    def _split(self, tensors):
        m = self.tracking.microbatch_size

        def split(t):
            usable = tf.shape(t)[0] // m * m
            return tf.reshape(
                t[:usable], tf.concat([[-1, m], tf.shape(t)[1:]], 0)
            )

        return tf.nest.map_structure(split, tensors)

    def _fused_pass(self, x, y, sample_weight):
        """Per-sample gradients, the update gradient and y_pred in one
        vectorized forward/backward pass (batch divisible by M)."""
        kernel = gradients_lib._kernel_for(self, None, True, False)
        fn = kernel.function
        params, state = fn.read_parameters(), fn.read_state()

        def one(sample):
            weight = sample[2] if len(sample) == 3 else None
            batch = Batch(sample[0], sample[1], weight)
            return gradients_lib.sample_gradient(fn, params, state, batch)

        elems = (self._split(x), self._split(y))
        if sample_weight is not None:
            elems += (self._split(sample_weight),)
        with pfor_safe_einsum(), gradients_lib.quiet_pfor():
            stacked, means, preds = tf.vectorized_map(
                one, elems, fallback_to_while_loop=False
            )
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Keras scales each replica's loss by 1 / replicas: do the same.
        grads = [tf.reduce_mean(g, axis=0) / replicas for g in stacked]
        rows = gradients_lib.flat_rows(stacked)
        y_pred = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)),
            preds,
        )
        return y_pred, tf.reduce_mean(means), grads, rows

    def _separate_rows(self, x, y, sample_weight):
        kernel = gradients_lib._kernel_for(self, None, True, False)
        weight = None if sample_weight is None else self._split(sample_weight)
        return kernel._flat(self._split(x), self._split(y), weight)

    def train_step(self, data):
        if self.tracking is None:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        config = self.tracking
        step = self.optimizer.iterations
        tracked = tf.equal(tf.math.floormod(step, config.every), 0)
        count = tf.shape(tf.nest.flatten(x)[0])[0]
        m = config.microbatch_size
        dim = sum(math.prod(v.shape) for v in self.trainable_variables)
        rows = None
        if self._fusable():

            def keras_branch():
                # Untracked steps, and tracked ones whose batch M does not
                # divide (a partial last batch): Keras' update, and sample
                # gradients of the first multiple of M examples if tracked.
                y_pred, loss, grads = self._keras_pass(x, y, sample_weight)
                rows = tf.cond(
                    tracked,
                    lambda: self._separate_rows(x, y, sample_weight),
                    lambda: tf.zeros([count // m, dim], tf.float64),
                )
                return y_pred, loss, grads, rows

            y_pred, loss, grads, rows = tf.cond(
                tracked & tf.equal(count % m, 0),
                lambda: self._fused_pass(x, y, sample_weight),
                keras_branch,
            )
        else:
            y_pred, loss, grads = self._keras_pass(x, y, sample_weight)
        self._loss_tracker.update_state(loss, sample_weight=count)
        weights = self.trainable_weights
        values = dict(zip(self.tracking_keys, tf.unstack(self._tracked)))
        # MirroredStrategy cannot run collectives (or assign mirrored
        # variables) inside graph conditionals: the conditionals below only
        # choose what to compute, every collective and assignment runs
        # unconditionally (with zeros on untracked steps).
        context = tf.distribute.get_replica_context()
        replicated = context.num_replicas_in_sync > 1
        # Each replica's loss was divided by the replica count: the sum of
        # replica gradients is the global-batch gradient.
        total = context.all_reduce("sum", grads) if replicated else grads
        values["grad/step_norm"] = tf.where(
            tracked, _global_norm(total), values["grad/step_norm"]
        )
        if config.gram:
            if rows is None:
                # Stateful models: one extra vectorized pass (through
                # stateless_call, so the update is Keras' own).
                rows = tf.cond(
                    tracked,
                    lambda: self._separate_rows(x, y, sample_weight),
                    lambda: tf.zeros([count // m, dim], tf.float64),
                )
            values.update(self._gram_step(tracked, values, rows))
        if config.hessian_every:
            due = tf.equal(tf.math.floormod(step, config.hessian_every), 0)
            values[_HESSIAN_KEY] = self._power_step(
                due, values[_HESSIAN_KEY], x, y, sample_weight
            )
        before = [tf.identity(w) for w in weights]
        self.optimizer.apply_gradients(zip(grads, weights))
        values["grad/update_norm"] = tf.where(
            tracked,
            _global_norm([w - b for w, b in zip(weights, before)]),
            values["grad/update_norm"],
        )
        self._tracked.assign(
            tf.stack(
                [tf.cast(values[k], tf.float64) for k in self.tracking_keys]
            )
        )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs.update(values)
        return logs

    def _gram_step(self, tracked, values, rows):
        context = tf.distribute.get_replica_context()
        if context.num_replicas_in_sync > 1:
            rows = context.all_gather(rows, axis=0)
        return tf.cond(
            tracked,
            lambda: gram_statistics_tf(
                tf.matmul(rows, rows, transpose_b=True),
                self.tracking.microbatch_size,
            ),
            lambda: {k: values[k] for k in GRAM_KEYS},
        )

    def _power_step(self, due, previous, x, y, sample_weight):
        kernel = hessian_lib._kernel_for(self, None, True, True, "auto", False)
        shapes = [v.shape for v in self.trainable_variables]
        sizes = [math.prod(s) for s in shapes]
        current = tf.convert_to_tensor(self._hessian_vector)

        def local_hvp():
            vector = [
                tf.reshape(part, shape)
                for part, shape in zip(tf.split(current, sizes), shapes)
            ]
            hv = kernel._hvp(vector, x, y, sample_weight)
            count = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], hv[0].dtype)
            return tf.concat([tf.reshape(t, [-1]) for t in hv], 0) / count

        hv = tf.cond(due, local_hvp, lambda: tf.zeros_like(current))
        context = tf.distribute.get_replica_context()
        if context.num_replicas_in_sync > 1:
            hv = context.all_reduce("mean", hv)
        norm = tf.norm(hv)
        self._hessian_vector.assign(
            tf.where(due & (norm > 0), hv / norm, current)
        )
        estimate = tf.cast(tf.reduce_sum(hv * current), tf.float64)
        return tf.where(due, estimate, previous)


def track(
    model: keras.Model, tracking: TrackingConfig | dict | None = None, **kwargs
) -> TrackingModel:
    """Wraps a functional or sequential model in a `TrackingModel`.

    The result shares the layers (and so the weights) of `model`; compile
    it and call `fit` on it.

    Args:
        model: a built functional or `keras.Sequential` model.
        tracking: a `TrackingConfig` or dict; or pass its fields as kwargs.
    """
    if tracking is None:
        tracking = TrackingConfig(**kwargs)
    elif kwargs:
        raise ValueError("Pass either `tracking` or its fields, not both.")
    if not getattr(model, "inputs", None):
        raise ValueError(
            "track() needs a functional or built Sequential model (with "
            "`model.inputs`); for a subclassed model, subclass "
            "tf_breakeven.training.TrackingModel instead of keras.Model."
        )
    return TrackingModel(
        inputs=model.inputs,
        outputs=model.outputs,
        name=f"tracked_{model.name}",
        tracking=tracking,
    )
