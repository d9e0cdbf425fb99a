"""Step probes: what `TrackingModel.train_step` measures, one object each.

A probe has the init/update shape of an optax transformation:

* `keys`: the log keys it produces, in order;
* `init(model)`: checks the model and creates the probe's own state (its
  `tf.Variable`s), once, before the first trace;
* `update(context, previous)`: this step's values as a dict of float64
  scalars, from a `StepContext` and the values logged at the previous step
  (logged again on steps the probe does not measure).

`ProbeChain` composes probes in order (like `optax.chain`) and holds the
values logged last. A probe with `after_update = True` (the update norm)
runs after the optimizer's update, the others before it.

The probes here: `GradientNorm` (`grad/step_norm`), `UpdateNorm`
(`grad/update_norm`), `BatchGram` (the `GRAM_KEYS` statistics of the
batch's sample gradients) and `PowerIteration` (one warm-started power
step on the batch Hessian, `hessian/lambda_1_running`).

Under a `tf.distribute` strategy a probe runs once per replica on the
replica's share of the batch. MirroredStrategy cannot run collectives (or
assign mirrored variables) inside graph conditionals, so in every probe the
conditionals only choose what to compute: every collective and assignment
runs unconditionally, with zeros on steps that measure nothing
(docs/pitfalls.md#P19).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from tf_breakeven import ghost as ghost_lib
from tf_breakeven import gradients as gradients_lib
from tf_breakeven import hessian as hessian_lib
from tf_breakeven import linalg, statistics
from tf_breakeven.functional import Batch, has_batch_norm

BATCH_PREFIX = "batch/"
# The Gram statistics a tracked train step logs (the others cost the same
# but are left to the callbacks, which measure a fixed probe set).
_STEP_STATISTICS = frozenset(
    {
        "grad_cov/lambda_1",
        "grad_cov/trace",
        "grad_cov/trace_over_lambda_1",
        "confusion/eta",
        "confusion/cos_min",
        "confusion/cos_mean",
        "grad/norm",
        "grad/diversity",
        "grad/noise_scale",
    }
)
GRAM_KEYS = tuple(
    BATCH_PREFIX + key
    for key in statistics.metric_keys()
    if key in _STEP_STATISTICS
)


class StepContext(NamedTuple):
    """What a probe sees of one train step (on one replica).

    Attributes:
        model: the model being trained.
        batch: this replica's share of the step's batch.
        step: the optimizer's iteration counter before the update.
        tracked: bool scalar, whether this step is tracked.
        gradients: the gradients the update applies (this replica's: its
            loss was divided by the replica count).
        rows: float64 sample-gradient rows [n, P] if the forward/backward
            pass made them (the fused pass), else None.
        before: the trainable weights before the update; None until the
            update ran (only after-update probes see it).
    """

    model: keras.Model
    batch: Batch
    step: tf.Tensor
    tracked: tf.Tensor
    gradients: list
    rows: tf.Tensor | None = None
    before: list | None = None


def replicated_variable(initial: Any, name: str) -> tf.Variable:
    """Probe state: identical on every replica (each assigns one value)."""
    return tf.Variable(
        initial,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def global_norm(tensors) -> tf.Tensor:
    """float64 norm of a list of tensors taken as one vector."""
    return tf.sqrt(
        tf.add_n(
            [tf.reduce_sum(tf.square(tf.cast(t, tf.float64))) for t in tensors]
        )
    )


def batch_size(x: Any) -> tf.Tensor:
    """The number of examples in the (possibly nested) inputs x."""
    return tf.shape(tf.nest.flatten(x)[0])[0]


def _replica_context():
    """The replica context and whether there are several replicas."""
    context = tf.distribute.get_replica_context()
    return context, context.num_replicas_in_sync > 1


class StepProbe(tf.Module):
    """Base of the probes: no state, measures before the update.

    A `tf.Module`, so the probe's variables are saved with the model by
    `tf.train.Checkpoint`.
    """

    keys: tuple[str, ...] = ()
    after_update = False

    def init(self, model: keras.Model) -> None:
        """Checks the model and creates the probe's state."""
        del model

    def update(self, context: StepContext, previous: dict) -> dict:
        raise NotImplementedError


class GradientNorm(StepProbe):
    """`grad/step_norm`: norm of the global-batch gradient of the update."""

    keys = ("grad/step_norm",)

    def update(self, context, previous):
        grads = context.gradients
        replica, replicated = _replica_context()
        if replicated:
            # Each replica's loss was divided by the replica count: the sum
            # of the replica gradients is the global-batch gradient
            # (docs/pitfalls.md#P14).
            grads = replica.all_reduce("sum", grads)
        (key,) = self.keys
        norm = global_norm(grads)
        return {key: tf.where(context.tracked, norm, previous[key])}


class UpdateNorm(StepProbe):
    """`grad/update_norm`: norm of the parameter change of the update."""

    keys = ("grad/update_norm",)
    after_update = True

    def update(self, context, previous):
        weights = context.model.trainable_weights
        change = [w - b for w, b in zip(weights, context.before)]
        (key,) = self.keys
        norm = global_norm(change)
        return {key: tf.where(context.tracked, norm, previous[key])}


def split_microbatches(tensors: Any, microbatch_size: int) -> Any:
    """Every tensor [N, ...] as [N // M, M, ...] (its first multiple of M
    examples)."""

    def split(t):
        usable = tf.shape(t)[0] // microbatch_size * microbatch_size
        return tf.reshape(
            t[:usable], tf.concat([[-1, microbatch_size], tf.shape(t)[1:]], 0)
        )

    return tf.nest.map_structure(split, tensors)


def split_batch(batch: Batch, microbatch_size: int) -> Batch:
    """A batch's samples [N // M, M, ...] (`split_microbatches`)."""
    return Batch(
        *(
            None if part is None else split_microbatches(part, microbatch_size)
            for part in batch
        )
    )


def ghost_kernel(model: keras.Model) -> gradients_lib.GhostKernel:
    """The ghost engine of a train step (the compiled loss, training
    mode, the model's own `jit_compile`)."""
    return gradients_lib.ghost_kernel(
        model, jit_compile=bool(getattr(model, "jit_compile", False))
    )


def gram_engine(
    model: keras.Model, batch: Batch, microbatch_size: int, method: str
) -> str:
    """The Gram engine ("materialize" or "ghost") of a tracked step,
    chosen while tracing from the batch's shapes.

    "auto" is `gradients.gradient_gram`'s choice, except that a fusable
    step (`TrackingModel.fusable`: its update is the mean of the
    materialized rows, which saves a pass) keeps the materialized engine
    while all rows fit `gradients.DEFAULT_MEMORY_BUDGET`. An unknown
    batch size counts as `ghost.ASSUMED_SAMPLES` samples.
    """
    if method == ghost_lib.MATERIALIZE:
        return method
    kernel = ghost_kernel(model)
    samples = split_batch(batch, microbatch_size)
    if method == "auto":
        budget = gradients_lib.DEFAULT_MEMORY_BUDGET
        if getattr(model, "fusable", False):
            if not kernel.rows_overflow(samples, budget):
                return ghost_lib.MATERIALIZE
        elif not kernel.saves(samples, budget):
            return ghost_lib.MATERIALIZE
    kernel.discover(samples)
    return ghost_lib.GHOST


def sample_rows(
    model: keras.Model, batch: Batch, microbatch_size: int
) -> tf.Tensor:
    """float64 rows [N // M, P] of the micro-batch gradients of a batch,
    one vectorized pass through `stateless_call` (no state changes)."""
    samples = split_batch(batch, microbatch_size)
    return gradients_lib.gradient_kernel(model).rows(*samples)


def tracked_rows(
    model: keras.Model, batch: Batch, microbatch_size: int, tracked
) -> tf.Tensor:
    """`sample_rows` on tracked steps, zeros of the same shape otherwise
    (also for a batch smaller than M: it has no micro-batch)."""
    dim = sum(math.prod(v.shape) for v in model.trainable_variables)
    count = batch_size(batch.x) // microbatch_size
    return tf.cond(
        tracked & (count > 0),
        lambda: sample_rows(model, batch, microbatch_size),
        lambda: tf.zeros([count, dim], tf.float64),
    )


def fused_pass(model: keras.Model, batch: Batch, microbatch_size: int):
    """The update and the sample gradients from one vectorized pass.

    For models without state and a batch that M divides: the mean of the
    micro-batch gradients is the batch gradient (to float roundoff).

    Returns:
        `(y_pred, loss, gradients, rows)`: outputs of the whole batch, the
        mean loss, this replica's update gradients (scaled by 1 / replicas
        like Keras' loss) and float64 sample rows [N / M, P].
    """
    fn = gradients_lib.gradient_kernel(model).function
    params, state = fn.read_parameters(), fn.read_state()

    def one(sample):
        weight = sample[2] if len(sample) == 3 else None
        sample = Batch(sample[0], sample[1], weight)
        return gradients_lib.sample_gradient(fn, params, state, sample)

    elems = (
        split_microbatches(batch.x, microbatch_size),
        split_microbatches(batch.y, microbatch_size),
    )
    if batch.sample_weight is not None:
        elems += (split_microbatches(batch.sample_weight, microbatch_size),)
    stacked, means, preds = gradients_lib.map_samples(
        one, elems, vectorized=True
    )
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    # Keras scales each replica's loss by 1 / replicas: do the same.
    grads = [tf.reduce_mean(g, axis=0) / replicas for g in stacked]
    y_pred = tf.nest.map_structure(
        lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)),
        preds,
    )
    rows = gradients_lib.flat_rows(stacked)
    return y_pred, tf.reduce_mean(means), grads, rows


class BatchGram(StepProbe):
    """`GRAM_KEYS`: Gram statistics of the batch's micro-batch gradients.

    The engine is `method` ("auto", "ghost" or "materialize", as in
    `gradients.gradient_gram`), resolved while tracing (`gram_engine`).
    The materialized engine uses the rows of the fused pass when there is
    one; otherwise (models with state, whose update stays Keras' own, and
    the ghost engine) one extra vectorized pass through `stateless_call`.
    A tracked batch of fewer than two micro-batches logs NaN. Under a
    strategy the rows (or the ghost signals) of all replicas are gathered,
    so every replica computes the statistics of the global batch.
    """

    keys = GRAM_KEYS

    def __init__(self, microbatch_size: int, method: str = "auto"):
        super().__init__()
        self.microbatch_size = microbatch_size
        self.method = gradients_lib.check_method(method)

    def init(self, model):
        # One example has no batch statistics (docs/pitfalls.md#P13).
        if self.microbatch_size == 1 and has_batch_norm(model):
            raise ValueError(
                "TrackingConfig(gram=True) on a model with "
                "BatchNormalization needs microbatch_size >= 2 (one example "
                "has no batch statistics)."
            )

    def update(self, context, previous):
        engine = gram_engine(
            context.model, context.batch, self.microbatch_size, self.method
        )
        if engine == ghost_lib.GHOST:
            count, gram = self._ghost_gram(context)
        else:
            count, gram = self._materialized_gram(context)
        # A batch of fewer than two micro-batches (a small last batch) has
        # no covariance: its tracked step logs NaN.
        nan = tf.constant(math.nan, tf.float64)
        return tf.cond(
            context.tracked,
            lambda: tf.cond(
                count >= 2,
                lambda: self._statistics(gram()),
                lambda: {key: nan for key in self.keys},
            ),
            lambda: {key: previous[key] for key in self.keys},
        )

    def _materialized_gram(self, context):
        """(samples, Gram thunk) from the rows (gathered over replicas)."""
        rows = context.rows
        if rows is None:
            rows = tracked_rows(
                context.model,
                context.batch,
                self.microbatch_size,
                context.tracked,
            )
        replica, replicated = _replica_context()
        if replicated:
            rows = replica.all_gather(rows, axis=0)
        return tf.shape(rows)[0], lambda: tf.matmul(
            rows, rows, transpose_b=True
        )

    def _ghost_gram(self, context):
        """(samples, Gram thunk) from the ghost signals of every sample
        (gathered over replicas: the Gram's cross-replica pairs need both
        samples' signals)."""
        m, batch = self.microbatch_size, context.batch
        kernel = ghost_kernel(context.model)
        samples = split_batch(batch, m)
        spec = kernel.signature(samples)
        count = batch_size(batch.x) // m

        def zeros():
            return kernel.join(
                tf.nest.map_structure(
                    lambda s: tf.zeros(
                        tf.concat([[count], s.shape], 0), s.dtype
                    ),
                    spec,
                )
            )

        signals = tf.cond(
            context.tracked & (count > 0),
            lambda: kernel.stacked_signals(*samples),
            zeros,
        )
        replica, replicated = _replica_context()
        if replicated:
            signals = tf.nest.map_structure(
                lambda t: tf.ensure_shape(
                    replica.all_gather(t, axis=0), [None, *t.shape[1:]]
                ),
                signals,
            )
            count = tf.shape(tf.nest.flatten(signals)[0])[0]

        def gram():
            regularization = []
            if kernel.regularized:  # the same for every sample
                first = Batch(
                    *(
                        None
                        if part is None
                        else tf.nest.map_structure(lambda t: t[:m], part)
                        for part in batch
                    )
                )
                regularization = kernel.regularization_gradients(*first)
            parts = kernel.variable_grams(
                signals, regularization, gradients_lib.DEFAULT_MEMORY_BUDGET
            )
            total = tf.reduce_sum(parts, axis=0)
            return (total + tf.transpose(total)) / 2

        return count, gram

    def _statistics(self, gram):
        stats = statistics.gram_statistics_tf(
            gram, microbatch_size=self.microbatch_size
        )
        return {key: stats[key[len(BATCH_PREFIX) :]] for key in self.keys}


class PowerIteration(StepProbe):
    """`hessian/lambda_1_running`: a running top Hessian eigenvalue.

    Every `every` steps, one power-iteration step on the current batch's
    Hessian (of the mean loss, replicas averaged), warm-started from the
    previous direction; logs the Rayleigh quotient of that direction. A
    batch whose product is not finite logs NaN and leaves the direction.
    """

    keys = ("hessian/lambda_1_running",)

    def __init__(self, every: int):
        super().__init__()
        self.every = every

    def init(self, model):
        dim = sum(math.prod(v.shape) for v in model.trainable_variables)
        start = tf.random.stateless_normal([dim], seed=[0, 0])
        dtype = model.trainable_variables[0].dtype
        self.vector = replicated_variable(
            tf.cast(start / tf.norm(start), dtype), "hessian_vector"
        )

    def update(self, context, previous):
        kernel = hessian_lib.hessian_kernel(context.model)
        current = tf.convert_to_tensor(self.vector)
        due = tf.equal(tf.math.floormod(context.step, self.every), 0)

        def local_hvp():
            vector = linalg.unflatten_tensors(current, kernel.function.shapes)
            hv = kernel.batch_hvp(vector, *context.batch)
            count = tf.cast(batch_size(context.batch.x), hv[0].dtype)
            return linalg.flatten_tensors(hv) / count

        hv = tf.cond(due, local_hvp, lambda: tf.zeros_like(current))
        replica, replicated = _replica_context()
        if replicated:
            hv = replica.all_reduce("mean", hv)
        norm = tf.norm(hv)
        # A zero, NaN or infinite product (a diverging batch) keeps the last
        # good direction, so the estimate recovers with the next finite one.
        usable = due & (norm > 0) & tf.math.is_finite(norm)
        self.vector.assign(tf.where(usable, hv / norm, current))
        estimate = tf.cast(tf.reduce_sum(hv * current), tf.float64)
        (key,) = self.keys
        return {key: tf.where(due, estimate, previous[key])}


class ProbeChain(tf.Module):
    """Probes composed in order, with the values logged last.

    `update` runs the probes of one phase (before the update while
    `context.before` is None, the after-update probes once it is set), each
    seeing the values of the probes before it.
    """

    def __init__(self, probes):
        super().__init__()
        self.probes = tuple(probes)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for probe in self.probes for key in probe.keys)

    def init(self, model: keras.Model) -> None:
        """Checks the model and creates all state, under its strategy."""
        with model.distribute_strategy.scope():
            for probe in self.probes:
                probe.init(model)
            nan = tf.constant(math.nan, tf.float64)
            self.last = replicated_variable(
                tf.fill([len(self.keys)], nan), "tracked_values"
            )

    def last_values(self) -> dict:
        return dict(zip(self.keys, tf.unstack(self.last)))

    def update(self, context: StepContext, values: dict) -> dict:
        values = dict(values)
        after = context.before is not None
        for probe in self.probes:
            if probe.after_update == after:
                values.update(probe.update(context, values))
        return values

    def store(self, values: dict) -> None:
        self.last.assign(
            tf.stack([tf.cast(values[key], tf.float64) for key in self.keys])
        )
