"""A custom training loop for `MultiWorkerMirroredStrategy`.

Keras 3.15's `model.fit` fails under `MultiWorkerMirroredStrategy`
(docs/pitfalls.md#P15; keras-team/keras#20585,
tensorflow/tensorflow#72388), while
`strategy.run` + `optimizer.apply` works. This loop drives the same Keras
callbacks (our measurement callbacks, History) through a `CallbackList`,
so records are the same as with `fit`:

* every worker reads the same global batches and takes its replica's
  contiguous slice, so a global batch is the one a single process sees;
* the loss is the model's compiled loss, reduced as Keras' default
  "sum_over_batch_size" over the global batch (per-replica sums of the
  per-example losses over the global batch size), and the optimizer
  all-reduces gradients in `apply`;
* every worker runs the measurements (their collectives need all of them),
  only the chief writes records;
* a `tf.train.CheckpointManager` saves model, optimizer and epoch at each
  epoch end (non-chief workers into scratch directories) and restores the
  latest on start, so a killed job resumes like `BackupAndRestore`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf


def _distributed_dataset(strategy, dataset, global_batch):
    def dataset_fn(context: tf.distribute.InputContext):
        per_replica = context.get_per_replica_batch_size(global_batch)
        start = context.input_pipeline_id * per_replica

        def take(x, y):
            def cut(t):
                return t[start : start + per_replica]

            return tf.nest.map_structure(cut, x), cut(y)

        return dataset.map(take)

    options = tf.distribute.InputOptions(
        experimental_fetch_to_device=True,
    )
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def per_example_loss(model: keras.Model) -> Callable:
    """The model's compiled loss as `fn(y_true, y_pred)` -> per-example.

    A `keras.losses.Loss` is rebuilt from its config with `reduction=None`,
    so it converts its inputs as when Keras calls it and only the reduction
    is left to the loop; a loss name or function is per-example already.

    Raises:
        ValueError: no compiled loss, one loss per output, or a `Loss`
            whose reduction is not Keras' default "sum_over_batch_size"
            (the reduction this loop applies).
    """
    loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        if config.get("reduction") != "sum_over_batch_size":
            raise ValueError(
                f"The multi-worker loop reduces losses as Keras' default "
                f"'sum_over_batch_size'; the model's loss has reduction "
                f"{config.get('reduction')!r}: compile without `reduction=`."
            )
        return type(loss).from_config({**config, "reduction": None})
    if callable(loss):
        return loss
    raise ValueError(
        "The multi-worker loop needs the model compiled with one loss "
        f"(a Keras loss, its name or fn(y_true, y_pred)); got {loss!r}."
    )


def make_train_step(
    model: keras.Model, strategy: tf.distribute.Strategy, global_batch: int
) -> Callable:
    """`train_step(iterator) -> (loss, accuracy)` of one global batch."""
    per_example = per_example_loss(model)
    optimizer = model.optimizer

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            losses = per_example(y, logits)
            loss = tf.reduce_sum(losses) / global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / (strategy.num_replicas_in_sync)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        correct = tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y),
            tf.float32,
        )
        return loss, tf.reduce_sum(correct) / global_batch

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        loss, accuracy = strategy.run(replica_step, args=(x, y))
        reduce = tf.distribute.ReduceOp.SUM
        return (
            strategy.reduce(reduce, loss, axis=None),
            strategy.reduce(reduce, accuracy, axis=None),
        )

    return train_step


class _Checkpoints(NamedTuple):
    manager: tf.train.CheckpointManager
    epoch: tf.Variable  # epochs done, saved with model and optimizer


def _restore(
    model: keras.Model, strategy: tf.distribute.Strategy, backup_dir: str
) -> _Checkpoints:
    """Restores model, optimizer and epoch from `backup_dir` if saved."""
    optimizer = model.optimizer
    with strategy.scope():
        optimizer.build(model.trainable_variables)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, epoch=epoch
        )
    manager = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=2)
    manager.restore_or_initialize()
    return _Checkpoints(manager, epoch)


def fit(
    model: keras.Model,
    spec: Any,
    strategy: tf.distribute.Strategy,
    config: Any,
    callbacks: list[keras.callbacks.Callback],
    *,
    backup_dir: str,
    steps_per_epoch: int,
) -> dict:
    """Trains `model` for `config.epochs`; returns the History dict."""
    checkpoints = _restore(model, strategy, backup_dir)
    initial_epoch = int(checkpoints.epoch.numpy())
    train_step = make_train_step(model, strategy, config.batch_size)
    callback_list = keras.callbacks.CallbackList(
        callbacks,
        add_history=True,
        add_progbar=config.verbose > 0,
        model=model,
        verbose=config.verbose,
        epochs=config.epochs,
        steps=steps_per_epoch,
    )
    # Epoch-seeded batches from the step we resume at.
    train = spec.train_epochs.steps(
        initial_epoch * steps_per_epoch,
        max(config.epochs, initial_epoch + 1) * steps_per_epoch,
    )
    iterator = iter(_distributed_dataset(strategy, train, config.batch_size))
    epoch_logs: dict = {}
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, config.epochs):
        callback_list.on_epoch_begin(epoch)
        epoch_logs = _epoch(
            callback_list, train_step, iterator, steps_per_epoch
        )
        callback_list.on_epoch_end(epoch, epoch_logs)
        checkpoints.epoch.assign(epoch + 1)
        checkpoints.manager.save()
    callback_list.on_train_end(epoch_logs)
    return model.history.history if model.history else {}


def _epoch(callback_list, train_step, iterator, steps: int) -> dict:
    """Runs `steps` train steps; returns the epoch's mean loss/accuracy."""
    total_loss = total_accuracy = 0.0
    for step in range(steps):
        callback_list.on_train_batch_begin(step)
        loss, accuracy = train_step(iterator)
        total_loss += float(loss)
        total_accuracy += float(accuracy)
        logs = {
            "loss": total_loss / (step + 1),
            "accuracy": total_accuracy / (step + 1),
        }
        callback_list.on_train_batch_end(step, logs)
    return dict(logs)
