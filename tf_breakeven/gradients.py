"""Per-example and micro-batch gradients, and their Gram matrix.

A probe set of N examples (in data order) is split into n = N / M samples
of M consecutive examples (M = `microbatch_size`; M = 1 means per-example).
The gradient g_i of sample i is the gradient of the Keras-style mean loss on
that micro-batch, run through the model *as its own batch*:
`(1/M) sum_{j in i} w_j l_j (+ regularization)`. So with
BatchNormalization in training mode, g_i uses the micro-batch's own
statistics (what SGD with batch size M would see), and M = 1 is refused in
that case: a single example has no batch statistics (docs/pitfalls.md#P13). With
M = 1 and `training=False`, g_i is the exact per-example gradient and the
mean of the g_i is the full-batch gradient.

Sample gradients are computed with `tf.vectorized_map` inside a
`tf.function` (pfor; docs/pitfalls.md#P9: 1.1-5.6x one batch gradient,
against B^2 growth for `tape.jacobian`), with `fallback_to_while_loop=False`
so an op pfor cannot vectorize raises instead of silently looping.

Models with a Keras RNN layer running a `tf.while_loop` (`unroll=False`)
cannot go through pfor (docs/pitfalls.md#P11). For those the sample gradients
are computed by a `tf.map_fn` loop over samples inside the same `tf.function`
(exact, but several times slower); build the RNN with `unroll=True` to get
the vectorized path.

Two engines build the Gram matrix G_ij = <g_i, g_j> (`method=`):

* "materialize" (`SampleRows`) accumulates it block by block in float64
  from the rows: at most two chunks of sample gradients are held at once,
  and the chunk size follows from `memory_budget` (bytes). The per-block
  traces Tr(K_b) (`gradient_trace_by_block`) come from the same rows, one
  chunk at a time.
* "ghost" (`GhostRows`, `GhostKernel`) never forms the sample gradients
  of the tapped kernels: one vectorized pass returns their inputs and
  output gradients, and `tf_breakeven.ghost` turns them into one [n, n]
  Gram per variable (memory O(n^2 + activations)). The covariance's
  eigenvectors are then gradients of weighted losses (`GhostRows.combine`).
* "auto" (the default) takes "ghost" when it saves work or memory
  (`GhostKernel.saves`).
"""

from __future__ import annotations

import contextlib
import logging as logging_lib
import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_breakeven import ghost, linalg, statistics
from tf_breakeven.blocks import BlocksLike, flat_columns, variable_blocks
from tf_breakeven.distribute import concat_over_replicas
from tf_breakeven.functional import (
    Batch,
    LossLike,
    ModelFunction,
    concat_batches,
    dense,
    has_batch_norm,
    measurement_warning,
    pfor_safe_einsum,
    probe_batches,
    rolled_recurrent_variables,
    slice_batch,
)
from tf_breakeven.operators import (
    ProbeOperator,
    cached_kernel,
    check_fits,
    loss_key,
)
from tf_breakeven.validation import ArgumentError, check_int

DEFAULT_MEMORY_BUDGET = 2 << 30
# "auto" takes the ghost engine when its ghost/sparse kernels hold at least
# this share of the parameters (measured: ResNets and DenseNet under 1%,
# the MLPs, CNNs with a dense head, LSTMs and BERT 47% or more).
GHOST_SHARE = 0.25
_ZERO = tf.UnconnectedGradients.ZERO


class _DropConvFilterWarning(logging_lib.Filter):
    # pfor's Conv2DBackpropFilter converter loops internally and says so on
    # every trace; it is not a fallback (docs/pitfalls.md#P10: it works with
    # fallback_to_while_loop=False), so the warning only misleads.
    def filter(self, record: logging_lib.LogRecord) -> bool:
        return "Conv2DBackpropFilter uses a while_loop" not in str(record.msg)


@contextlib.contextmanager
def quiet_pfor():
    """Drops pfor's misleading Conv2DBackpropFilter warning while tracing."""
    logger = tf.get_logger()
    drop = _DropConvFilterWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _split_samples(batch: Batch, microbatch_size: int) -> Batch:
    """Reshapes every tensor [N, ...] to [n, M, ...]."""

    def split(t):
        return tf.reshape(t, [-1, microbatch_size] + t.shape[1:].as_list())

    return Batch(
        tf.nest.map_structure(split, batch.x),
        tf.nest.map_structure(split, batch.y),
        None if batch.sample_weight is None else split(batch.sample_weight),
    )


def sample_gradient(
    function: ModelFunction, params, state, sample: Batch
) -> tuple[list[tf.Tensor], tf.Tensor, Any]:
    """Gradient, mean loss and outputs of one sample run as its own batch.

    The sample's loss is the mean of its weighted per-example losses; the
    gradients are dense (Embedding's IndexedSlices are densified).
    """
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses, y_pred = function.per_example_losses(
            params, state, *sample, return_outputs=True
        )
        mean = tf.reduce_mean(losses)
    grads = tape.gradient(mean, params, unconnected_gradients=_ZERO)
    return [dense(g, p) for g, p in zip(grads, params)], mean, y_pred


def flat_rows(stacked: list[tf.Tensor]) -> tf.Tensor:
    """Stacked per-variable sample gradients as float64 rows [n, P]."""
    n = tf.shape(stacked[0])[0]
    return tf.concat(
        [tf.reshape(tf.cast(g, tf.float64), [n, -1]) for g in stacked],
        axis=1,
    )


def map_samples(
    one: Callable[[tuple], Any],
    elems: tuple,
    *,
    vectorized: bool,
    output_signature: Any = None,
) -> Any:
    """`one(sample)` for every sample along axis 0 of `elems`, stacked.

    Vectorized by pfor (`tf.vectorized_map` without a while-loop fallback,
    Keras' einsum routed to `tf.einsum`, see `functional.pfor_safe_einsum`),
    or, for models pfor cannot vectorize (`vectorized=False`: rolled RNNs),
    a `tf.map_fn` loop with `output_signature`. Call it inside a
    `tf.function`.
    """
    if vectorized:
        with pfor_safe_einsum(), quiet_pfor():
            return tf.vectorized_map(one, elems, fallback_to_while_loop=False)
    return tf.map_fn(one, elems, fn_output_signature=output_signature)


class GradientKernel:
    """`tf.function`s computing stacked sample gradients for one model.

    Shared per model configuration (`gradient_kernel`).

    Attributes:
        function: the model and loss as a pure function.
        vectorized: whether samples go through pfor (False: a loop, for
            rolled recurrent layers).
        sample_gradients: `tf.function` `(x, y, sample_weight)` with inputs
            shaped [n, M, ...] -> one [n, *variable.shape] tensor per
            trainable variable.
        flat_sample_gradients: the same as float64 rows [n, P].
    """

    def __init__(self, function: ModelFunction, jit: bool):
        self.function = function
        self.vectorized = not function.has_rolled_recurrence
        self.sample_gradients = tf.function(self.stacked, jit_compile=jit)
        self.flat_sample_gradients = tf.function(self.rows, jit_compile=jit)

    def stacked(self, x, y, sample_weight):
        """Gradients of every sample, untraced; inputs shaped [n, M, ...]."""
        fn = self.function
        params, state = fn.read_parameters(), fn.read_state()

        def one(sample):
            weight = sample[2] if len(sample) == 3 else None
            batch = Batch(sample[0], sample[1], weight)
            return sample_gradient(fn, params, state, batch)[0]

        elems = (x, y) if sample_weight is None else (x, y, sample_weight)
        return map_samples(
            one,
            elems,
            vectorized=self.vectorized,
            output_signature=[tf.TensorSpec(p.shape, p.dtype) for p in params],
        )

    def rows(self, x, y, sample_weight):
        """`stacked` as float64 rows [n, P], untraced."""
        return flat_rows(self.stacked(x, y, sample_weight))


def gradient_kernel(
    model: keras.Model,
    loss: LossLike = None,
    *,
    training: bool = True,
    jit_compile: bool = False,
) -> GradientKernel:
    """The shared `GradientKernel` of a model configuration."""
    key = ("gradients", loss_key(loss), bool(training), bool(jit_compile))

    def build():
        function = ModelFunction(model, loss, training=training)
        kernel = GradientKernel(function, jit_compile)
        if not kernel.vectorized:
            logging.warning(
                "tf_breakeven: %s has a recurrent layer with unroll=False; "
                "sample gradients use a sequential tf.map_fn loop (exact but "
                "slower). Build it with unroll=True to vectorize them.",
                model.name,
            )
        return kernel

    return cached_kernel(model, key, build)


class GhostKernel:
    """`tf.function`s of the ghost Gram engine for one model configuration.

    This class is long because discovery, the vectorized pass and the
    assembly all read the same tapped layout.

    Shared per model configuration (`ghost_kernel`). `discover` traces
    one sample once to find which kernels are tapped (`tf_breakeven.ghost`);
    the vectorized pass `signals` then returns, stacked over samples, the
    inputs and output gradients of every tapped call and the sample
    gradients of the other variables, and `parts` turns them into one Gram
    matrix per variable.

    Attributes:
        function: the model and loss as a pure function.
        vectorized: whether samples go through pfor (False: a loop).
        tapped: `{variable index: [(kind, options) per call]}` once
            discovered; `others`: the indices of the other variables.
        regularized: tapped indices with a weight-regularizer gradient.
    """

    def __init__(self, function: ModelFunction, jit: bool):
        self.function = function
        self.vectorized = not function.has_rolled_recurrence
        rolled = rolled_recurrent_variables(function.model)
        self.allowed = {
            i for i, v in enumerate(function.variables) if id(v) not in rolled
        }
        self.tapped: dict[int, list] | None = None
        self.others: list[int] = []
        self.regularized: list[int] = []
        self._signatures: dict = {}
        self._methods: dict = {}
        self.jit = bool(jit)
        self.signals = tf.function(self.stacked_signals, jit_compile=jit)
        self.parts = tf.function(self.variable_grams, jit_compile=jit)
        self.regularization = tf.function(
            self.regularization_gradients, jit_compile=jit
        )

    def sample_signals(self, params, state, sample: Batch, found=None):
        """One sample's (tapped inputs, their output gradients, other
        gradients), each a tuple in call order; untraced. With `found`
        (a dict), records what was tapped, leaked and regularized."""
        fn = self.function
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(params)
            recorder = ghost.Recorder(fn.variables, self.allowed, tape)
            with recorder.active():
                data, reg, _ = fn.losses_and_regularization(
                    params, state, *sample
                )
            data = tf.reduce_mean(data)
            total = data if reg is None else data + reg
        tapped = sorted(recorder.calls)
        others = [i for i in range(len(params)) if i not in recorder.calls]
        if found is not None:
            leaks = tape.gradient(data, [params[i] for i in tapped])
            found["leaks"] = [i for i, g in zip(tapped, leaks) if g is not None]
            found["calls"] = {
                i: [(c.kind, c.options) for c in recorder.calls[i]]
                for i in tapped
            }
            found["others"] = others
            regs = [None] * len(tapped)
            if reg is not None:
                regs = tape.gradient(reg, [params[i] for i in tapped])
            found["regularized"] = [
                i for i, g in zip(tapped, regs) if g is not None
            ]
        calls = [c for i in tapped for c in recorder.calls[i]]
        grads = tape.gradient(
            total,
            [c.outputs for c in calls] + [params[i] for i in others],
            unconnected_gradients=_ZERO,
        )
        del tape
        inputs = tuple(c.inputs for c in calls)
        other = tuple(
            dense(g, params[i]) for g, i in zip(grads[len(calls) :], others)
        )
        return inputs, tuple(grads[: len(calls)]), other

    def discover(self, samples: Batch) -> None:
        """Finds the tapped kernels by tracing the first sample (once per
        sample shape: the loop of rolled recurrent models needs the
        output signature)."""
        first = _first_sample(samples)
        key = _spec_key(first)
        if key in self._signatures:
            return
        if tf.executing_eagerly():  # (a train step's batch fits its model)
            _check_fits(self, samples)
        fn = self.function
        while True:
            found: dict = {}

            def trace(*sample):
                return self.sample_signals(
                    fn.read_parameters(),
                    fn.read_state(),
                    Batch(*sample),
                    found,  # noqa: B023
                )

            concrete = tf.function(trace, autograph=False)
            concrete = concrete.get_concrete_function(*first)
            if not found["leaks"]:
                break
            self.allowed -= set(found["leaks"])
        self.tapped, self.others = found["calls"], found["others"]
        self.regularized = found["regularized"]
        self._signatures[key] = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype),
            concrete.structured_outputs,
        )

    def signature(self, samples: Batch) -> Any:
        """One sample's signal specs (`sample_signals`), discovered once
        per sample shape."""
        self.discover(samples)
        return self._signatures[_spec_key(_first_sample(samples))]

    def layer_methods(self, samples: Batch, memory_budget: int) -> dict:
        """`{variable index: ghost.layer_method}` of every tapped kernel
        for these samples [n, M, ...], from the traced shapes (nothing
        runs; cached per shape and budget)."""
        spec = self.signature(samples)
        n = tf.nest.flatten(samples.x)[0].shape[0]
        key = (_spec_key(_first_sample(samples)), n, int(memory_budget))
        if key not in self._methods:
            chosen = {}

            def trace(inputs, grads):
                inputs, grads, _ = self.join((inputs, grads, ()))
                for layer, _, _ in self.layers(inputs, grads):
                    chosen[layer.index] = ghost.layer_method(
                        layer, memory_budget, self.jit
                    )
                return tf.constant(0)

            stacked = tf.nest.map_structure(
                lambda s: tf.TensorSpec([n, *s.shape], s.dtype), spec[:2]
            )
            tf.function(trace, autograph=False).get_concrete_function(*stacked)
            self._methods[key] = chosen
        return self._methods[key]

    def saves(self, samples: Batch, memory_budget: int) -> bool:
        """Whether the ghost engine is the better one for these samples
        [n, M, ...] (n may be unknown while tracing).

        True when the kernels that take a ghost or sparse product
        (`ghost.layer_method`) hold at least `GHOST_SHARE` of the
        parameters, or when the materialized rows would not fit
        `memory_budget` in one chunk (they would be recomputed chunk by
        chunk). Where the other kernels dominate (convolutions over many
        positions form their sample gradients either way) the ghost
        engine does the same work plus its patches and an extra pass:
        measured 1.07-1.35x slower on ResNet-20, where those kernels hold
        99% of the parameters (BENCHMARKS.md section 11).
        """
        methods = self.layer_methods(samples, memory_budget)
        shapes = self.function.shapes
        dim = self.function.dim
        saved = sum(
            math.prod(shapes[i])
            for i, m in methods.items()
            if m != ghost.MATERIALIZE
        )
        if saved >= GHOST_SHARE * dim:
            return True
        return bool(methods) and self.rows_overflow(samples, memory_budget)

    def rows_overflow(self, samples: Batch, memory_budget: int) -> bool:
        """Whether the materialized rows of these samples [n, M, ...]
        would not fit `memory_budget` in one chunk (an unknown n counts as
        `ghost.ASSUMED_SAMPLES`)."""
        n = tf.nest.flatten(samples.x)[0].shape[0] or ghost.ASSUMED_SAMPLES
        dim = self.function.dim
        return chunk_size(n, dim, memory_budget, check=False) < n

    def stacked_signals(self, x, y, sample_weight):
        """`sample_signals` of every sample, stacked; inputs [n, M, ...]."""
        fn = self.function
        params, state = fn.read_parameters(), fn.read_state()

        def one(sample):
            weight = sample[2] if len(sample) == 3 else None
            return self.sample_signals(
                params, state, Batch(sample[0], sample[1], weight)
            )

        elems = (x, y) if sample_weight is None else (x, y, sample_weight)
        signals = map_samples(
            one,
            elems,
            vectorized=self.vectorized,
            output_signature=self._signatures.get(
                _spec_key(_first_sample(Batch(x, y, sample_weight)))
            ),
        )
        return self.join(signals)

    def join(self, signals):
        """Stacked signals per tapped call -> per entry (`entries`): the
        calls of a kernel used by several matmuls or lookups (an unrolled
        RNN's steps) joined along positions into one tensor. Fewer
        tensors cross the `tf.function` boundaries (passing an unrolled
        LSTM's 518 took 21 ms a call: docs/pitfalls.md#P31)."""
        inputs, grads, others = signals
        joined_inputs, joined_grads, position = [], [], 0
        for calls in self.tapped.values():
            count = len(calls)
            ins = list(inputs[position : position + count])
            outs = list(grads[position : position + count])
            position += count
            if _joins(calls):
                kind = calls[0][0]
                ins = [ghost.join_calls(ins, ids=kind == "take")]
                outs = [ghost.join_calls(outs, ids=False)]
            joined_inputs += ins
            joined_grads += outs
        return tuple(joined_inputs), tuple(joined_grads), tuple(others)

    def entries(self) -> list[tuple[int, list]]:
        """`(variable index, [(kind, options) per signal])` in the order
        of the joined signals (`join`)."""
        return [
            (index, calls[:1] if _joins(calls) else calls)
            for index, calls in self.tapped.items()
        ]

    def regularization_gradients(self, x, y, sample_weight):
        """The weight regularizers' gradients of `regularized`, untraced
        (the same for every sample; computed on the one sample given)."""
        fn = self.function
        params = fn.read_parameters()
        recorder = ghost.Recorder(fn.variables, self.allowed)
        with tf.GradientTape() as tape:
            tape.watch(params)
            with recorder.active():
                _, reg, _ = fn.losses_and_regularization(
                    params, fn.read_state(), x, y, sample_weight
                )
        return tape.gradient(reg, [params[i] for i in self.regularized])

    def layers(self, inputs, grads) -> list[tuple[ghost.Layer, Any, Any]]:
        """(Layer, a, b) of every tapped kernel from joined signals
        (`join`), calls joined."""
        shapes = self.function.shapes
        out, position = [], 0
        for index, calls in self.entries():
            parts = []
            for kind, options in calls:
                parts.append(
                    ghost.shaped(
                        inputs[position], grads[position], kind, options
                    )
                )
                position += 1
            a = tf.concat([p[0] for p in parts], axis=1)
            b = tf.concat([p[1] for p in parts], axis=1)
            kind, options = calls[0]
            shape = tuple(shapes[index].as_list())
            d_in = shape[0] if kind == "take" else a.shape[-1]
            layer = ghost.Layer(
                index,
                kind,
                options,
                shape,
                a.shape[0],
                a.shape[1],
                d_in,
                b.shape[-1],
            )
            out.append((layer, a, b))
        return out

    def variable_grams(self, signals, regularization, memory_budget):
        """One float64 [n, n] Gram matrix per trainable variable, stacked
        [V, n, n], from `signals` and the regularizers' gradients."""
        inputs, grads, others = signals
        grams = [None] * len(self.function.shapes)
        regs = dict(zip(self.regularized, regularization))
        for layer, a, b in self.layers(inputs, grads):
            method = ghost.layer_method(layer, memory_budget, self.jit)
            gram = ghost.layer_gram(layer, a, b, method, memory_budget)
            if layer.index in regs:
                r = regs[layer.index]
                terms = ghost.regularizer_terms(layer, a, b, r)
                norm = tf.reduce_sum(tf.square(tf.cast(r, tf.float64)))
                gram += terms[:, None] + terms[None, :] + norm
            grams[layer.index] = gram
        for index, stacked in zip(self.others, others):
            rows = flat_rows([stacked])
            grams[index] = tf.matmul(rows, rows, transpose_b=True)
        return tf.stack(grams)


def _joins(calls: list) -> bool:
    """Whether a kernel's calls are joined into one signal (`join`)."""
    kinds = {kind for kind, _ in calls}
    return len(calls) > 1 and len(kinds) == 1 and kinds <= {"matmul", "take"}


def _first_sample(samples: Batch) -> tuple:
    """The first sample of `samples` [n, M, ...] as a batch [M, ...]."""
    return tuple(
        None if part is None else tf.nest.map_structure(lambda t: t[0], part)
        for part in samples
    )


def _spec_key(sample: tuple) -> tuple:
    return tuple(
        (tuple(t.shape.as_list()), t.dtype.name)
        for t in tf.nest.flatten([p for p in sample if p is not None])
    )


def ghost_kernel(
    model: keras.Model,
    loss: LossLike = None,
    *,
    training: bool = True,
    jit_compile: bool = False,
) -> GhostKernel:
    """The shared `GhostKernel` of a model configuration."""
    key = ("ghost", loss_key(loss), bool(training), bool(jit_compile))
    return cached_kernel(
        model,
        key,
        lambda: GhostKernel(
            ModelFunction(model, loss, training=training), jit_compile
        ),
    )


def prepare_samples(
    model: keras.Model, data: Any, microbatch_size: int, training: bool
) -> Batch:
    """The probe set as n samples of M examples, tensors [n, M, ...].

    Raises:
        ValueError: M not an int >= 1, M = 1 with BatchNormalization in
            training mode, or M not dividing the number of examples.
    """
    check_microbatch_size(model, microbatch_size, training)
    return split_samples(probe_batches(data), microbatch_size)


def check_microbatch_size(
    model: keras.Model, microbatch_size: int, training: bool
) -> int:
    """Validates M for `model` (see `prepare_samples`); returns it."""
    microbatch_size = check_int("microbatch_size", microbatch_size, 1)
    if microbatch_size == 1 and training and has_batch_norm(model):
        raise ArgumentError(
            "The model has BatchNormalization and `training=True`: a single "
            "example has no batch statistics, so per-example gradients are "
            "undefined. Pass `training=False` (inference-mode statistics) or "
            "`microbatch_size >= 2` (each micro-batch uses its own "
            "statistics)."
        )
    return microbatch_size


def split_samples(batches: list[Batch], microbatch_size: int) -> Batch:
    """Probe batches joined and split into samples of M, [n, M, ...]."""
    batch = concat_batches(batches)
    total = tf.nest.flatten(batch.x)[0].shape[0]
    if total % microbatch_size:
        raise ArgumentError(
            f"`microbatch_size={microbatch_size}` does not divide the "
            f"{total} probe examples; pass a divisor of {total} or trim the "
            f"probe set to {total - total % microbatch_size} examples."
        )
    return _split_samples(batch, int(microbatch_size))


def _check_fits(kernel: GradientKernel | GhostKernel, samples: Batch) -> None:
    """Traces the first sample's losses: a clear error if it does not fit
    the model or the loss."""
    fn = kernel.function
    check_fits(
        lambda *batch: fn.per_example_losses(
            fn.read_parameters(), fn.read_state(), *batch
        ),
        [Batch(*_first_sample(samples))],
    )


def per_example_gradients(
    model: keras.Model,
    data: Any,
    *,
    loss: LossLike = None,
    training: bool = True,
    jit_compile: bool = False,
) -> list[tf.Tensor]:
    """Gradient of every example's loss, vectorized.

    Args:
        model: a built Keras model.
        data: `(x, y[, sample_weight])` or a finite `tf.data.Dataset` of such
            batches.
        loss: None for the compiled loss, else a Keras loss, its name or a
            callable `fn(y_true, y_pred)`.
        training: model mode; with BatchNormalization only `False` works
            (see the module docstring).
        jit_compile: compile with XLA.

    Returns:
        One tensor per trainable variable, shaped `[N, *variable.shape]`;
        row i is the gradient of `w_i * l_i (+ regularization)`.
    """
    samples = prepare_samples(model, data, 1, training)
    kernel = gradient_kernel(
        model, loss, training=training, jit_compile=jit_compile
    )
    _check_fits(kernel, samples)
    return kernel.sample_gradients(*samples)


def chunk_size(
    n: int, dim: int, memory_budget: int, *, check: bool = True
) -> int:
    """Samples per chunk of rows for `memory_budget` bytes.

    All n when every row fits (each gradient computed once); otherwise the
    size of which two chunks fit at once (blocks a and b of the Gram).
    With `check=False`, 0 instead of an error when no row fits.
    """
    # A sample's row: float32 gradient + its float64 copy.
    per_sample = dim * (4 + 8)
    if n * per_sample <= memory_budget:
        return n  # one chunk: every gradient computed once
    # Otherwise two chunks are held at once (block a, block b).
    size = int(memory_budget // (2 * per_sample))
    if size < 1 and check:
        raise ArgumentError(
            f"One sample gradient needs {2 * per_sample} bytes ({dim} "
            f"parameters, two chunks) but `memory_budget={memory_budget}`; "
            "raise `memory_budget` or measure a smaller model."
        )
    return size


def gradient_gram(
    model: keras.Model,
    data: Any,
    *,
    method: str = "auto",
    microbatch_size: int = 1,
    loss: LossLike = None,
    training: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    jit_compile: bool = False,
) -> np.ndarray:
    """Gram matrix G_ij = <g_i, g_j> of the sample gradients, float64.

    Args:
        model, data, loss, training, jit_compile: see
            `per_example_gradients`.
        method: the engine. "materialize" forms every sample gradient as
            a float64 row; "ghost" builds the Gram from the inputs and
            output gradients of the model's Dense, EinsumDense, Conv1D/2D
            and Embedding kernels without forming their sample gradients
            (`tf_breakeven.ghost`; the other variables keep theirs), with
            memory O(n^2 + activations) instead of O(n P). "auto" (the
            default) takes "ghost" when the kernels cheaper that way (a
            ghost or shared-token product) hold at least a quarter of the
            parameters, or when the rows would not fit `memory_budget` in
            one chunk, else "materialize" (`GhostKernel.saves`); the
            choice is logged at debug level. Both are exact (tested equal
            to 1e-5 relative), under a strategy and with XLA.
        microbatch_size: M, examples per sample (must divide N).
        memory_budget: bytes for the sample-gradient rows held at once
            (12 bytes per parameter and sample). If all n rows fit they are
            computed once; otherwise chunk pairs are recomputed block by
            block. It does not bound the activations of the vectorized
            forward/backward pass, which grow like those of one batch of a
            chunk's examples. The ghost engine reads it as the bound of
            each layer's part (`ghost.layer_method`).

    Returns:
        A symmetric [n, n] numpy float64 array, n = N / M.
    """
    return sample_rows(
        model,
        data,
        method=method,
        microbatch_size=microbatch_size,
        loss=loss,
        training=training,
        memory_budget=memory_budget,
        jit_compile=jit_compile,
    ).gram()


class _Samples(ProbeOperator):
    """A probe set as n samples of M examples (`samples`, [n, M, ...]),
    for one engine's `kernel`; the base of `SampleRows` and `GhostRows`."""

    def __init__(
        self,
        model: keras.Model,
        data: Any,
        kernel: GradientKernel | GhostKernel,
        microbatch_size: int,
        training: bool,
        jit_compile: bool,
    ):
        self.microbatch_size = check_microbatch_size(
            model, microbatch_size, training
        )
        self.kernel = kernel
        super().__init__(kernel.function, data, None, jit_compile=jit_compile)
        self.samples = split_samples(self.batches, self.microbatch_size)
        self.n = tf.nest.flatten(self.samples.x)[0].shape[0]


class SampleRows(_Samples):
    """Flat float64 sample gradients of a probe set, chunk by chunk.

    The probe set is split into n samples of M examples
    (`prepare_samples`); rows are computed by the shared `GradientKernel`
    in chunks that fit `memory_budget`, and under a multi-replica strategy
    each replica computes a share of a chunk's rows, gathered in order.

    Args:
        model, data, microbatch_size, loss, training, memory_budget,
            jit_compile: see `gradient_gram`.
    """

    method = "materialize"

    def __init__(
        self,
        model: keras.Model,
        data: Any,
        *,
        microbatch_size: int = 1,
        loss: LossLike = None,
        training: bool = True,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        jit_compile: bool = False,
    ):
        kernel = gradient_kernel(
            model, loss, training=training, jit_compile=jit_compile
        )
        super().__init__(
            model, data, kernel, microbatch_size, training, jit_compile
        )
        _check_fits(self.kernel, self.samples)
        self.chunk = chunk_size(self.n, self.dim, memory_budget)
        self.starts = list(range(0, self.n, self.chunk))
        self._single = None  # the rows, when they fit in one chunk

    def rows(self, start: int) -> tf.Tensor:
        """Rows [start, start + chunk) as float64 [chunk, P]."""
        if self._single is not None:
            return self._single
        rows = concat_over_replicas(
            self.strategy,
            self.kernel.flat_sample_gradients,
            tuple(
                slice_batch(
                    self.samples, start, min(start + self.chunk, self.n)
                )
            ),
        )
        if len(self.starts) == 1:
            self._single = rows
        return rows

    def gram(self) -> np.ndarray:
        """G_ij = <g_i, g_j>, a symmetric float64 [n, n] numpy array."""
        blocks = {}
        for a, start_a in enumerate(self.starts):
            rows_a = self.rows(start_a)
            for start_b in self.starts[a:]:
                rows_b = rows_a if start_b == start_a else self.rows(start_b)
                blocks[start_a, start_b] = tf.matmul(
                    rows_a, rows_b, transpose_b=True
                )
        gram = np.zeros((self.n, self.n), np.float64)
        for (start_a, start_b), block in blocks.items():
            block = block.numpy()
            stop_a = start_a + block.shape[0]
            stop_b = start_b + block.shape[1]
            gram[start_a:stop_a, start_b:stop_b] = block
            gram[start_b:stop_b, start_a:stop_a] = block.T
        return gram

    def block_traces(self, blocks: dict[str, list[int]]) -> dict[str, float]:
        """Tr(K_b) of the centered covariance restricted to each block.

        Tr(K_b) = (1/n) (sum_i ||g_{i,b}||^2 - ||sum_i g_{i,b}||^2 / n),
        from column sums and sums of squares accumulated chunk by chunk
        and variable by variable: no per-block Gram matrix, and no copy of
        a chunk larger than one variable's columns.

        Args:
            blocks: `{name: indices into model.trainable_variables}`, as
                `blocks.variable_blocks` gives them.

        Returns:
            `{name: Tr(K_b)}` as Python floats (float64 arithmetic); NaN
            for a block whose sample gradients are not all finite.

        Raises:
            ArgumentError: fewer than 2 samples.
        """
        _check_num_samples(self.n)
        indices = sorted({i for members in blocks.values() for i in members})
        columns = dict(zip(indices, flat_columns(self.shapes, indices)))
        sums = dict.fromkeys(indices, 0.0)
        squares = dict.fromkeys(indices, 0.0)
        for start in self.starts:
            rows = self.rows(start)
            for i, (begin, end) in columns.items():
                part = rows[:, begin:end]
                sums[i] += tf.reduce_sum(part, axis=0)
                squares[i] += tf.reduce_sum(tf.square(part))
        return {
            name: _centered_trace(
                sum(float(squares[i]) for i in members),
                sum(float(tf.reduce_sum(tf.square(sums[i]))) for i in members),
                self.n,
            )
            for name, members in blocks.items()
        }

    def combine(self, coefficients: np.ndarray) -> tf.Tensor:
        """sum_i coefficients[j, i] g_i for every row j, float64 [k, P]."""
        total = None
        for start in self.starts:
            rows = self.rows(start)
            part = tf.matmul(
                tf.constant(coefficients[:, start : start + rows.shape[0]]),
                rows,
            )
            total = part if total is None else total + part
        return total


METHODS = ("auto", "ghost", "materialize")


def check_method(method: str) -> str:
    """Validates a Gram engine name (see `gradient_gram`)."""
    if method not in METHODS:
        raise ArgumentError(
            f"`method={method!r}` is not a Gram engine; pass one of "
            f"{', '.join(repr(m) for m in METHODS)}."
        )
    return method


class GhostRows(_Samples):
    """The ghost engine's Gram matrix of a probe set's sample gradients.

    The same samples as `SampleRows` (n samples of M examples, each run as
    its own batch), but no sample gradient of a tapped kernel is formed
    (`tf_breakeven.ghost`). The signals are computed once, under a
    multi-replica strategy a share of the samples per replica (gathered
    in order); the Gram matrices are per variable, so block traces and
    the covariance's eigenvectors come from the same pass.

    Args:
        model, data, microbatch_size, loss, training, memory_budget,
            jit_compile: see `gradient_gram`; `memory_budget` bounds each
            layer's part (`ghost.layer_method`).
        kernel: the model's `GhostKernel`, already discovered.
    """

    method = "ghost"

    def __init__(
        self,
        model: keras.Model,
        data: Any,
        *,
        microbatch_size: int = 1,
        loss: LossLike = None,
        training: bool = True,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        jit_compile: bool = False,
        kernel: GhostKernel | None = None,
    ):
        kernel = kernel or ghost_kernel(
            model, loss, training=training, jit_compile=jit_compile
        )
        super().__init__(
            model, data, kernel, microbatch_size, training, jit_compile
        )
        self.kernel.discover(self.samples)  # checks the samples fit
        self.memory_budget = int(memory_budget)
        self._signals = None
        self._parts = None
        self._regularization = None

    def saves(self, memory_budget: int) -> bool:
        """Whether this engine is cheaper here (`GhostKernel.saves`)."""
        return self.kernel.saves(self.samples, memory_budget)

    def signals(self) -> tuple:
        """The stacked signals of all samples (computed once)."""
        if self._signals is None:
            self._signals = concat_over_replicas(
                self.strategy, self.kernel.signals, tuple(self.samples)
            )
        return self._signals

    def regularization(self) -> list[tf.Tensor]:
        """The weight regularizers' gradients of the tapped kernels
        (computed once)."""
        if self._regularization is None:
            self._regularization = []
            if self.kernel.regularized:
                self._regularization = self.kernel.regularization(
                    *_first_sample(self.samples)
                )
        return self._regularization

    def parts(self) -> tf.Tensor:
        """Per-variable Gram matrices, float64 [V, n, n]."""
        if self._parts is None:
            self._parts = self.kernel.parts(
                self.signals(), self.regularization(), self.memory_budget
            )
        return self._parts

    def gram(self) -> np.ndarray:
        """G_ij = <g_i, g_j>, a symmetric float64 [n, n] numpy array."""
        gram = tf.reduce_sum(self.parts(), axis=0).numpy()
        return (gram + gram.T) / 2

    def block_traces(self, blocks: dict[str, list[int]]) -> dict[str, float]:
        """Tr(K_b) of each block, as `SampleRows.block_traces`."""
        _check_num_samples(self.n)
        parts = self.parts().numpy()
        out = {}
        for name, members in blocks.items():
            gram = parts[list(members)].sum(axis=0)
            out[name] = _centered_trace(
                float(np.trace(gram)), float(gram.sum()), self.n
            )
        return out

    def combine(self, coefficients: np.ndarray) -> tf.Tensor:
        """sum_i coefficients[j, i] g_i for every row j, float64 [k, P]."""
        inputs, grads, others = self.signals()
        c = tf.constant(coefficients, tf.float64)
        pieces = [None] * len(self.function.shapes)
        regs = dict(zip(self.kernel.regularized, self.regularization()))
        for layer, a, b in self.kernel.layers(inputs, grads):
            total = ghost.layer_combination(layer, a, b, c)
            if layer.index in regs:
                r = tf.cast(regs[layer.index], tf.float64)
                total += tf.reduce_sum(c, axis=1)[:, None, None] * r[None]
            pieces[layer.index] = tf.reshape(total, [c.shape[0], -1])
        for index, stacked in zip(self.kernel.others, others):
            pieces[index] = tf.matmul(c, flat_rows([stacked]))
        return tf.concat(pieces, axis=1)


def sample_rows(
    model: keras.Model,
    data: Any,
    *,
    method: str = "auto",
    microbatch_size: int = 1,
    loss: LossLike = None,
    training: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    jit_compile: bool = False,
) -> SampleRows | GhostRows:
    """The Gram engine `method` picks for the model, on the probe set.

    "auto" takes the ghost engine when it saves work or memory
    (`GhostKernel.saves`), else the materialized one; the choice is
    logged at debug level.
    """
    check_method(method)
    kwargs = dict(
        microbatch_size=microbatch_size,
        loss=loss,
        training=training,
        memory_budget=memory_budget,
        jit_compile=jit_compile,
    )
    if method == "materialize":
        return SampleRows(model, data, **kwargs)
    rows = GhostRows(model, data, **kwargs)
    if method == "auto" and not rows.saves(memory_budget):
        logging.debug("tf_breakeven Gram of %s: materialized", model.name)
        return SampleRows(model, data, **kwargs)
    logging.debug(
        "tf_breakeven Gram of %s: ghost, %d kernels tapped",
        model.name,
        len(rows.kernel.tapped),
    )
    return rows


def _check_num_samples(n: int) -> int:
    """Raises unless there are the 2 samples a covariance needs."""
    if n < 2:
        raise ArgumentError(
            f"need at least 2 sample gradients, got n={n}; use a larger "
            "probe set or a smaller microbatch_size."
        )
    return n


def _centered_trace(squares: float, sum_squared: float, n: int) -> float:
    """(squares - sum_squared / n) / n, clipped at 0; NaN if not finite.

    The clip drops roundoff of identical sample gradients; an Inf (an
    overflowing gradient) is NaN like the rest of the library's outputs.
    """
    trace = (squares - sum_squared / n) / n
    if not math.isfinite(trace):
        return math.nan
    return max(trace, 0.0)


def gradient_trace_by_block(
    model: keras.Model,
    data: Any,
    *,
    method: str = "auto",
    blocks: BlocksLike = "layer",
    microbatch_size: int = 1,
    loss: LossLike = None,
    training: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    jit_compile: bool = False,
) -> dict[str, float]:
    """Each block's share Tr(K_b) of the trace of the gradient covariance.

    K is the centered covariance of the sample gradients (see
    `tf_breakeven.statistics`); Tr(K_b) = (1/n) sum_i ||g_{i,b} -
    g_bar_b||^2 sums the diagonal of K over the parameters of block b, so
    blocks that partition the parameters (`blocks="layer"`) add up to
    `grad_cov/trace`. It says which layers carry the gradient noise.

    Args:
        model, data, loss, training, memory_budget, jit_compile: see
            `gradient_gram`.
        blocks: "layer" (one block per top-level layer, "other" for
            variables no layer owns) or a mapping `{name: variables}` of
            trainable variables or their `.path` strings; see
            `tf_breakeven.blocks`.
        microbatch_size: M, examples per sample (must divide N).

    Returns:
        `{block name: Tr(K_b)}`, Python floats computed in float64, in the
        order of `blocks.variable_blocks`. Non-finite sample gradients
        (NaN or Inf in the probe or the weights) give NaN, with a warning.

    Raises:
        ArgumentError: a bad `blocks` (see `blocks.variable_blocks`),
            fewer than 2 samples, or M not dividing N.
    """
    indices = variable_blocks(model, blocks)
    traces = sample_rows(
        model,
        data,
        method=method,
        microbatch_size=microbatch_size,
        loss=loss,
        training=training,
        memory_budget=memory_budget,
        jit_compile=jit_compile,
    ).block_traces(indices)
    if any(math.isnan(value) for value in traces.values()):
        measurement_warning(
            "gradient_trace_by_block: non-finite sample gradients (NaN or "
            "Inf in the probe inputs or the weights, e.g. a diverging run); "
            "returning NaN."
        )
    return traces


def gradient_covariance_eigenpairs(
    model: keras.Model,
    data: Any,
    k: int = 5,
    *,
    method: str = "auto",
    microbatch_size: int = 1,
    centered: bool = True,
    loss: LossLike = None,
    training: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    jit_compile: bool = False,
) -> tuple[np.ndarray, list[list[tf.Tensor]]]:
    """Top-k eigenpairs of the gradient covariance K, in parameter space.

    This function is long because its contract (NaN and rank cases) is
    documented in full.

    The eigenvectors are combinations of the sample gradients
    (`statistics.top_directions` on the Gram matrix), assembled without
    forming the P x P covariance.

    Args:
        model, data, loss, training, memory_budget, jit_compile: see
            `gradient_gram`.
        k: number of directions; fewer come back when K has a smaller
            numerical rank (the centered K has rank <= n - 1).
        microbatch_size: M, examples per sample.
        centered: K (default, the paper's) or the uncentered (1/n) sum
            g_i g_i^T.

    Returns:
        `(eigenvalues, eigenvectors)`: float64 [k'] descending, and k' unit
        vectors, each a list of tensors shaped like the trainable variables.
        Non-finite sample gradients (NaN or Inf in the probe or the
        weights) give k' = min(k, n) NaN eigenvalues and NaN vectors, with
        a warning; zero or identical gradients give k' = 0. Fewer than 2
        samples is an `ArgumentError`.
    """
    rows = sample_rows(
        model,
        data,
        method=method,
        microbatch_size=microbatch_size,
        loss=loss,
        training=training,
        memory_budget=memory_budget,
        jit_compile=jit_compile,
    )
    eigenvalues, coefficients = statistics.top_directions(
        rows.gram(), k, centered=centered
    )
    if not np.all(np.isfinite(eigenvalues)):
        measurement_warning(
            "gradient_covariance_eigenpairs: non-finite sample gradients "
            "(NaN or Inf in the probe inputs or the weights, e.g. a "
            "diverging run); returning NaN."
        )
    function = rows.kernel.function
    directions = tf.cast(rows.combine(coefficients), function.dtype)
    return eigenvalues, [
        linalg.unflatten_tensors(d, function.shapes)
        for d in tf.unstack(directions)
    ]


def gradient_statistics(
    model: keras.Model,
    data: Any,
    *,
    method: str = "auto",
    microbatch_size: int = 1,
    k: int = 5,
    loss: LossLike = None,
    training: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    jit_compile: bool = False,
    **statistics_kwargs: Any,
) -> dict[str, float]:
    """Covariance spectrum, conditioning, confusion and noise of gradients.

    Computes `gradient_gram` and then its statistics
    (`statistics_from_gram`);
    see `tf_breakeven.statistics` for the keys (`grad_cov/lambda_1`,
    `confusion/eta`, `grad/noise_scale`, ...).

    Returns:
        A dict of Python floats. NaN values (NaN or Inf in the probe or the
        weights; degenerate gradients, see `statistics.gram_statistics`)
        come with one warning.

    Raises:
        ArgumentError: fewer than 2 samples, or M not dividing N.
    """
    k = check_int("k", k, 1)
    gram = gradient_gram(
        model,
        data,
        method=method,
        microbatch_size=microbatch_size,
        loss=loss,
        training=training,
        memory_budget=memory_budget,
        jit_compile=jit_compile,
    )
    return statistics_from_gram(
        gram, microbatch_size=microbatch_size, k=k, **statistics_kwargs
    )


_STATISTICS: dict = {}


def statistics_from_gram(
    gram: np.ndarray, *, microbatch_size: int = 1, k: int = 5, **kwargs: Any
) -> dict[str, float]:
    """The statistics of a sample-gradient Gram matrix, as Python floats.

    The library's one implementation, `statistics.gram_statistics_tf`, in a
    `tf.function` traced once per Gram size and configuration (the numpy
    `statistics.gram_statistics` is its independent reference).

    Args:
        gram: the [n, n] Gram matrix of n >= 2 sample gradients.
        microbatch_size, k, **kwargs: see `statistics.gram_statistics`.

    Raises:
        ValueError: fewer than two samples, or a bad argument.
    """
    n = int(np.shape(gram)[0])
    if n < 2:
        raise ArgumentError(
            f"need at least 2 sample gradients, got a Gram matrix of n={n}; "
            "use a larger probe set or a smaller microbatch_size."
        )
    if "quantiles" in kwargs:
        kwargs["quantiles"] = tuple(kwargs["quantiles"])
    key = (microbatch_size, k, tuple(sorted(kwargs.items())))
    if key not in _STATISTICS:
        _STATISTICS[key] = tf.function(
            lambda g: statistics.gram_statistics_tf(
                g, microbatch_size=microbatch_size, k=k, **kwargs
            )
        )
    values = _STATISTICS[key](tf.convert_to_tensor(gram, tf.float64))
    stats = {name: float(value) for name, value in values.items()}
    _log_nan(gram, stats)
    return stats


def _log_nan(gram: np.ndarray, stats: dict[str, float]) -> None:
    """One warning when some statistics are NaN (never raises)."""
    nan = sorted(key for key, value in stats.items() if math.isnan(value))
    if not nan:
        return
    if not np.all(np.isfinite(gram)):
        measurement_warning(
            "gradient statistics: non-finite sample gradients (NaN or Inf "
            "in the probe inputs or the weights, e.g. a diverging run); "
            "returning NaN."
        )
    else:
        measurement_warning(
            "gradient statistics: %s are NaN: degenerate sample gradients "
            "(K = 0 when all are identical, no cosines with fewer than two "
            "nonzero ones, 0/0 when all are zero).",
            nan,
        )
