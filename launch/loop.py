"""A custom training loop for `MultiWorkerMirroredStrategy`.

Keras 3.15's `model.fit` fails under `MultiWorkerMirroredStrategy`
(TRAPS.md 15; keras-team/keras#20585, tensorflow/tensorflow#72388), while
`strategy.run` + `optimizer.apply` works. This loop drives the same Keras
callbacks (our measurement callbacks, History) through a `CallbackList`,
so records are the same as with `fit`:

* every worker reads the same global batches and takes its replica's
  contiguous slice, so a global batch is the one a single process sees;
* the loss is the global-batch mean (per-replica sums over the global
  batch size), and the optimizer all-reduces gradients in `apply`;
* every worker runs the measurements (their collectives need all of them),
  only the chief writes records;
* a `tf.train.CheckpointManager` saves model, optimizer and epoch at each
  epoch end (non-chief workers into scratch directories) and restores the
  latest on start, so a killed job resumes like `BackupAndRestore`.
"""

from __future__ import annotations

from typing import Any

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
    global_batch = config.batch_size
    per_example = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    optimizer = model.optimizer
    with strategy.scope():
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, epoch=epoch_var
        )
    manager = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=2)
    manager.restore_or_initialize()
    initial_epoch = int(epoch_var.numpy())

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

    callback_list = keras.callbacks.CallbackList(
        callbacks,
        add_history=True,
        add_progbar=config.verbose > 0,
        model=model,
        verbose=config.verbose,
        epochs=config.epochs,
        steps=steps_per_epoch,
    )
    # Epoch-seeded batches from the epoch we resume at.
    train = spec.train_epochs(
        initial_epoch, max(config.epochs, initial_epoch + 1)
    )
    iterator = iter(_distributed_dataset(strategy, train, global_batch))
    epoch_logs: dict = {}
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, config.epochs):
        callback_list.on_epoch_begin(epoch)
        total_loss = total_accuracy = 0.0
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            loss, accuracy = train_step(iterator)
            total_loss += float(loss)
            total_accuracy += float(accuracy)
            logs = {
                "loss": total_loss / (step + 1),
                "accuracy": total_accuracy / (step + 1),
            }
            callback_list.on_train_batch_end(step, logs)
        epoch_logs = dict(logs)
        callback_list.on_epoch_end(epoch, epoch_logs)
        epoch_var.assign(epoch + 1)
        manager.save()
    callback_list.on_train_end(epoch_logs)
    return model.history.history if model.history else {}
