"""One function maps a strategy name to a `tf.distribute` strategy."""

from __future__ import annotations

import tensorflow as tf


def get_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """A strategy by name.

    Args:
        name: "default" (no distribution), "mirrored" (all local GPUs, or
            the logical CPUs), "multi_worker" (`MultiWorkerMirroredStrategy`
            from `TF_CONFIG`), "tpu" (`TPUStrategy`).
        tpu: TPU address for "tpu": "" or "local" on a Cloud TPU VM, a
            name or grpc:// address otherwise.

    Raises:
        ValueError: unknown name, or "tpu" without a reachable TPU.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return _tpu_strategy(tpu or "local")
    raise ValueError(
        f"Unknown strategy {name!r}: use default, mirrored, multi_worker "
        "or tpu."
    )


def _tpu_strategy(address: str) -> tf.distribute.Strategy:
    """`TPUStrategy` on the TPU at `address`; ValueError if there is none."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=address
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err) else ""
        raise ValueError(
            f"--strategy=tpu found no TPU at --tpu={address!r} "
            f"({type(err).__name__}: {first_line[:200]}). Run on a Cloud "
            "TPU VM with --tpu=local, pass --tpu=<TPU name or grpc://"
            "address>, or use --strategy=default or --strategy=mirrored "
            "(GPUs or CPU)."
        ) from err
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes records and checkpoints."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0)
