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
  The engine is `TrackingConfig.method` ("auto" by default: the ghost
  engine of `tf_breakeven.ghost` when it is cheaper for the model, see
  `gradients.gradient_gram`). With the materialized engine, for models
  without state (no BatchNormalization, no dropout) and
  without loss scaling, a tracked step runs ONE vectorized
  forward/backward pass: the update uses the mean of the micro-batch
  gradients (the batch gradient, up to float roundoff). Models with state
  keep Keras' own update and compute the sample gradients in one extra
  vectorized pass through `stateless_call` (their micro-batch gradients
  use micro-batch statistics, which the batch update must not);
* with `hessian_every=n`: one warm-started power-iteration step on the
  current batch's Hessian every n steps, `hessian/lambda_1_running`.

Each quantity is a step probe of `tf_breakeven.step_probes` with its own
state (`probes_for(config)` lists them); `train_step` runs Keras'
forward/backward (public `compute_loss` / `compute_metrics`, or the fused
pass), the probes before the update, the update, and the probes after it.

Whether a step is tracked is a graph conditional on the optimizer's
iteration counter (`every`), so nothing retraces. Tracking never changes
the update beyond float32 roundoff: with the same seed, a TrackingModel
follows the trajectory of a plain `keras.Model` to roundoff. Not bitwise:
the update (Keras' own computation, or the mean of the fused pass's
micro-batch gradients for stateless models) runs inside a larger graph,
which grappler and oneDNN may fuse differently on different CPUs. Under a
`tf.distribute` strategy each replica computes its share; gradients are
all-reduced for the norm, sample gradients all-gathered for the Gram
statistics, and Hessian-vector products averaged, so every replica holds
the same estimate.
"""

from __future__ import annotations

import dataclasses
import inspect

import keras
import tensorflow as tf

from tf_breakeven import gradients as gradients_lib
from tf_breakeven import step_probes
from tf_breakeven.functional import Batch
from tf_breakeven.step_probes import GRAM_KEYS, StepContext
from tf_breakeven.validation import check_int

__all__ = [
    "GRAM_KEYS",
    "TrackingConfig",
    "TrackingModel",
    "probes_for",
    "track",
]


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """What `TrackingModel.train_step` measures.

    Attributes:
        every: track every `every` optimizer steps (step 0, every, ...).
        gram: measure the Gram statistics of the batch's sample gradients.
        microbatch_size: M for the sample gradients (must divide the batch;
            a partial last batch uses its first multiple of M examples).
        hessian_every: one power-iteration HVP every n steps (0: off).
        method: the Gram engine, "auto", "ghost" or "materialize" (see
            `gradients.gradient_gram`), chosen when the step is traced
            (an unknown batch size counts as 128 samples). Only
            "materialize" fuses the update into the sample-gradient pass.
    """

    every: int = 1
    gram: bool = False
    microbatch_size: int = 1
    hessian_every: int = 0
    method: str = "auto"

    def __post_init__(self):
        check_int("every", self.every, 1)
        check_int("microbatch_size", self.microbatch_size, 1)
        check_int("hessian_every", self.hessian_every, 0, hint="0 is off.")
        gradients_lib.check_method(self.method)


def probes_for(config: TrackingConfig) -> step_probes.ProbeChain:
    """The step probes of a config, in the order of their log keys."""
    chain = [step_probes.GradientNorm(), step_probes.UpdateNorm()]
    if config.gram:
        chain.append(
            step_probes.BatchGram(config.microbatch_size, config.method)
        )
    if config.hessian_every:
        chain.append(step_probes.PowerIteration(config.hessian_every))
    return step_probes.ProbeChain(chain)


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
        self._probes = None

    @property
    def tracking_keys(self) -> tuple[str, ...]:
        return () if self.tracking is None else probes_for(self.tracking).keys

    @property
    def fusable(self) -> bool:
        """Whether tracked Gram steps take the update from the per-sample
        gradients of one vectorized pass.

        True for models without state (no BatchNormalization statistics,
        no dropout seeds), without loss scaling and without rolled
        recurrent layers: there the mean of the micro-batch gradients is
        the batch gradient.
        """
        return bool(
            self.tracking is not None
            and self.tracking.gram
            and not self.non_trainable_variables
            and not isinstance(
                self.optimizer, keras.optimizers.LossScaleOptimizer
            )
            and gradients_lib.gradient_kernel(self).vectorized
        )

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self._probes = None

    def make_train_function(self, force=False):
        # The probes' checks and state, before the first trace (`fit` and
        # `train_on_batch` come here once the model is built).
        if self._probes is None and self.tracking is not None:
            chain = probes_for(self.tracking)
            chain.init(self)
            self._probes = chain
        return super().make_train_function(force=force)

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

    def train_step(self, data):
        if self.tracking is None:
            return super().train_step(data)
        batch = Batch(*keras.utils.unpack_x_y_sample_weight(data))
        step = self.optimizer.iterations
        tracked = tf.equal(tf.math.floormod(step, self.tracking.every), 0)
        y_pred, loss, grads, rows = self._forward_backward(batch, tracked)
        self._track_loss(loss, batch)
        context = StepContext(self, batch, step, tracked, grads, rows)
        values = self._probes.update(context, self._probes.last_values())
        weights = self.trainable_weights
        before = [tf.identity(w) for w in weights]
        self.optimizer.apply_gradients(zip(grads, weights))
        values = self._probes.update(context._replace(before=before), values)
        self._probes.store(values)
        logs = self.compute_metrics(
            batch.x, batch.y, y_pred, sample_weight=batch.sample_weight
        )
        logs.update(values)
        return logs

    def _forward_backward(self, batch, tracked):
        """`(y_pred, loss, gradients, rows)` of the step; rows None unless
        the pass made them."""
        m = self.tracking.microbatch_size
        if not self.fusable or (
            step_probes.gram_engine(self, batch, m, self.tracking.method)
            != "materialize"
        ):
            return (*self._keras_pass(batch), None)

        def keras_branch():
            # Untracked steps, and tracked ones whose batch M does not
            # divide (a partial last batch): Keras' update, and sample
            # gradients of the first multiple of M examples if tracked.
            y_pred, loss, grads = self._keras_pass(batch)
            rows = step_probes.tracked_rows(self, batch, m, tracked)
            return y_pred, loss, grads, rows

        divides = tf.equal(step_probes.batch_size(batch.x) % m, 0)
        return tf.cond(
            tracked & divides,
            lambda: step_probes.fused_pass(self, batch, m),
            keras_branch,
        )

    def _keras_pass(self, batch):
        """Keras' own forward/backward: the update of a plain model.

        As Keras 3's TensorFlow `train_step`; returns `(y_pred, loss,
        gradients)` with the loss unscaled (Keras divides each replica's
        loss by the replica count, and logs it multiplied back:
        docs/pitfalls.md#P14).
        """
        x, y, sample_weight = batch
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            if "training" in inspect.signature(self.compute_loss).parameters:
                loss = self.compute_loss(
                    x, y, y_pred, sample_weight, training=True
                )
            else:  # an override from before Keras 3.3
                loss = self.compute_loss(x, y, y_pred, sample_weight)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.trainable_weights)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss * tf.cast(replicas, loss.dtype)
        return y_pred, loss, grads

    def _track_loss(self, loss, batch):
        # Keras' loss tracker: the `Mean` that `metrics` lists first, named
        # "loss", updated with the batch size as Keras' train_step does.
        tracker = next((m for m in self.metrics if m.name == "loss"), None)
        if tracker is not None:
            count = step_probes.batch_size(batch.x)
            tracker.update_state(loss, sample_weight=count)


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
