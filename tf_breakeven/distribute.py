"""Spreading probe work over the replicas of a `tf.distribute` strategy.

Measurements run in the cross-replica context (from a callback, or a
direct call). When the model was built under a strategy with several
replicas, per-batch work (Hessian-vector products, sample gradients) is
dealt out to the replicas with `strategy.run` and the results are reduced
(summed, or gathered in order). The solvers themselves run once, in the
cross-replica context, so their vectors are the same for every replica by
construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf


def replica_strategy(model: keras.Model) -> tf.distribute.Strategy | None:
    """The model's strategy if it has several replicas and we may use it."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or strategy.num_replicas_in_sync < 2:
        return None
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        return None  # already inside one replica (e.g. a train_step)
    return strategy


def _run(strategy, fn, shared, parts):
    """Runs `fn(*shared, *parts[r])` on replica r; returns PerReplica."""
    has_none = [p is None for p in parts[0]]

    def value_fn(context):
        part = parts[context.replica_id_in_sync_group]
        return tuple(p for p in part if p is not None)

    values = strategy.experimental_distribute_values_from_function(value_fn)

    def call(*args):
        it = iter(args)
        full = [None if none else next(it) for none in has_none]
        return fn(*shared, *full)

    return strategy.run(call, args=values)


def sum_over_batches(
    strategy: tf.distribute.Strategy | None,
    fn: Callable[..., Any],
    shared: Sequence[Any],
    batches: Sequence[Sequence[Any]],
) -> Any:
    """Sum over batches of `fn(*shared, *batch)`, one batch per replica."""
    total = None

    def add(part):
        nonlocal total
        total = (
            part
            if total is None
            else tf.nest.map_structure(tf.add, total, part)
        )

    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    full = len(batches) // replicas * replicas if strategy else 0
    for start in range(0, full, replicas):
        group = [tuple(b) for b in batches[start : start + replicas]]
        out = _run(strategy, fn, shared, group)
        add(strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None))
    for batch in batches[full:]:
        add(fn(*shared, *batch))
    return total


def concat_over_replicas(
    strategy: tf.distribute.Strategy | None,
    fn: Callable[..., Any],
    inputs: Sequence[Any],
) -> Any:
    """`fn(*inputs)` with every input split along axis 0 over replicas.

    `fn` may return a tensor or a nested structure of tensors; each is
    concatenated along axis 0 in replica order.

    Shares differ by at most one row when the leading size does not divide
    evenly (e.g. 5 samples on 2 replicas: 3 and 2; `strategy.gather` takes
    uneven shares); with fewer rows than replicas it is one call.
    """
    size = tf.nest.flatten(inputs[0])[0].shape[0]
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    if strategy is None or size < replicas:
        return fn(*inputs)
    bounds = [r * size // replicas for r in range(replicas + 1)]

    def cut(r):
        start, stop = bounds[r], bounds[r + 1]
        return tuple(
            None
            if t is None
            else tf.nest.map_structure(lambda a: a[start:stop], t)
            for t in inputs
        )

    out = _run(strategy, fn, (), [cut(r) for r in range(replicas)])
    # `strategy.gather` of a nested structure returns the first replica's
    # share only: gather every output on its own.
    return tf.nest.map_structure(lambda t: strategy.gather(t, axis=0), out)
