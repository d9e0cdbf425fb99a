"""Presets: a sensible set of measurement callbacks in one line.

Also `make_probe`, which draws a seeded probe set from training data.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import recording, schedules
from tf_breakeven.callbacks import (
    BreakEven,
    GradientConfusion,
    GradientCovariance,
    HessianSpectrum,
)


def _count(dataset: tf.data.Dataset) -> int:
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(0, lambda n, _: n + 1))


def make_probe(
    data: Any,
    size: int | float,
    *,
    batch_size: int = 128,
    seed: int = 0,
) -> tf.data.Dataset:
    """Draws a seeded random probe set from training data.

    Args:
        data: `(x, y[, sample_weight])` arrays, or a finite `tf.data.Dataset`
            of such batches (as passed to `fit`).
        size: number of examples, or a fraction in (0, 1] of the data.
        batch_size: batch size of the returned probe dataset.
        seed: which examples are drawn.

    Returns:
        A finite `tf.data.Dataset` of `size` examples in batches.
    """
    if isinstance(data, tf.data.Dataset):
        examples = data.unbatch()
        total = _count(examples)
    else:
        if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
            raise ValueError(
                "`data` must be (x, y[, sample_weight]) arrays or a "
                "tf.data.Dataset of such batches."
            )
        total = len(tf.nest.flatten(data[1])[0])
        examples = None
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ValueError(
                f"A fractional `size` must be in (0, 1]; got {size}."
            )
        size = max(1, int(round(size * total)))
    if size < 1 or size > total:
        raise ValueError(
            f"Probe size {size} must be between 1 and the {total} examples."
        )
    if examples is None:
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(total, size=size, replace=False))
        picked = tf.nest.map_structure(
            lambda a: np.asarray(a)[index], tuple(data)
        )
        return tf.data.Dataset.from_tensor_slices(picked).batch(batch_size)
    return (
        examples.shuffle(total, seed=seed, reshuffle_each_iteration=False)
        .take(size)
        .batch(batch_size)
        .cache()
    )


PRESETS = ("economy", "paper", "full")

# The "economy" preset: top eigenvalue only, on a small probe, by a short
# Lanczos warm-started from the previous eigenvector, at log-spaced steps.
# One measurement costs at most `ECONOMY_ITERATIONS` HVPs on
# `ECONOMY_PROBE_SIZE` examples, fewer once the warm start already meets
# the default tolerance; BENCHMARKS.md has the measured overhead.
ECONOMY_PROBE_SIZE = 64
ECONOMY_ITERATIONS = 4
ECONOMY_PER_DECADE = 2
# "paper" and "full" stop their Lanczos only at a residual of 1e-6 of the
# eigenvalue, where a float32 Ritz value has reached roundoff.
PAPER_TOL = 1e-6


def economy_break_even(probe: Any, **kwargs: Any) -> BreakEven:
    """The "economy" `BreakEven` on `probe` (kwargs override or add)."""
    kwargs.setdefault(
        "schedule", schedules.LogSpaced(per_decade=ECONOMY_PER_DECADE)
    )
    kwargs.setdefault("batch_sharpness", False)  # cheap: lambda_1 only
    return BreakEven(
        probe,
        k=1,
        num_iterations=ECONOMY_ITERATIONS,
        warm_start=True,
        **kwargs,
    )


def preset(
    name: str,
    train_data: Any = None,
    *,
    probe: tf.data.Dataset | None = None,
    recorder: recording.Recorder | str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    k: int = 1,
    microbatch_size: int | None = None,
    schedule: Any = None,
    jit_compile: bool = False,
) -> list[keras.callbacks.Callback]:
    """A sensible set of callbacks for a cost budget, in one line.

    * "economy" (cheap; the default of the launchers): `BreakEven` with
      k = 1 on 64 probe examples, warm-started 4-step Lanczos, at
      log-spaced steps (2 per decade). One cold 20-step power iteration
      costs ~25-30 small-CNN training steps (docs/pitfalls.md#P16); warm
      starts and log spacing keep the total small on long runs.
    * "paper": the papers' protocol each epoch on a 5% probe set:
      `BreakEven` (20 Lanczos steps), `GradientCovariance` and
      `GradientConfusion` with micro-batches of M = 128 (smaller if the
      probe is small).
    * "full": "paper" plus top-5 eigenvalues, trace, smallest eigenvalue,
      spectral density, the gradient's alignment with the top-5
      eigenspace, the spread of lambda_1 over 4 disjoint probe parts
      (`hessian/lambda_1_std`) and each layer's share of Tr(K), each epoch
      and at log-spaced steps.

    This is the one place where the measurement callbacks are composed;
    the launcher (`tf_breakeven.launch`) calls it with its flags.
    This function is long because it documents every knob of the presets
    in one place; its body delegates to `_economy`, `_paper` and
    `_microbatched`.

    Args:
        name: one of `PRESETS`.
        train_data: the training data (arrays or dataset), from which the
            probe set is drawn with `seed` (64 examples for "economy", 5%
            for the others).
        probe: instead of `train_data`, an already drawn probe dataset of
            batches: "economy" measures its first 64 examples, the others
            all of it.
        recorder: shared `Recorder` or JSONL path.
        seed: probe draw and solver seed.
        batch_size, dataset_size: S and N; when both are given,
            `BreakEven` uses the SGD criterion (eq. 1) for an SGD optimizer
            (and, in "paper" and "full", records the batch sharpness),
            else the full-batch one; Adam and RMSprop always get the
            preconditioned sharpness (`criterion="auto"`).
        k: top Hessian eigenvalues of "paper" / "full"'s `BreakEven`
            ("full"'s `HessianSpectrum` tracks max(5, k)); "economy" tracks
            one.
        microbatch_size: M of the Gram callbacks (None: min(128, probe
            size / 8)); the probe is cut to a multiple of M and must hold
            two micro-batches. Unused by "economy".
        schedule: when to measure (None: the preset's own, above).
        jit_compile: compile the measurements with XLA.

    Returns:
        A list of callbacks for `model.fit(..., callbacks=...)`.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose from {PRESETS}.")
    if (train_data is None) == (probe is None):
        raise ValueError(
            "Pass either `train_data` (the probe set is drawn from it) or an "
            "already drawn `probe`, not both."
        )
    common = {
        "recorder": recording.as_recorder(recorder),
        "seed": seed,
        "jit_compile": jit_compile,
    }
    criterion = _criterion(batch_size, dataset_size)
    if name == "economy":
        return [_economy(train_data, probe, schedule, criterion, common)]
    if probe is None:
        probe = make_probe(train_data, 0.05, seed=seed)
    if schedule is None:
        schedule = (
            "epoch"
            if name == "paper"
            else (schedules.EveryEpoch() | schedules.LogSpaced(per_decade=3))
        )
    probe, micro = _microbatched(probe, microbatch_size)
    return _paper(probe, name == "full", k, micro, schedule, criterion, common)


def _criterion(batch_size: int | None, dataset_size: int | None) -> dict:
    """S and N for `BreakEven`, when both are known: its "auto" criterion
    then takes the SGD condition (eq. 1) for SGD and the preconditioned
    sharpness for Adam and RMSprop."""
    if batch_size is None or dataset_size is None:
        return {}
    return {"batch_size": batch_size, "dataset_size": dataset_size}


def _economy(
    train_data: Any,
    probe: tf.data.Dataset | None,
    schedule: Any,
    criterion: dict,
    common: dict,
) -> BreakEven:
    if probe is None:
        probe = make_probe(
            train_data,
            _at_most(train_data, ECONOMY_PROBE_SIZE),
            seed=common["seed"],
        )
    else:
        probe = probe.unbatch().take(ECONOMY_PROBE_SIZE).batch(128)
    extra = {} if schedule is None else {"schedule": schedule}
    return economy_break_even(probe, **criterion, **common, **extra)


def _paper(
    probe: tf.data.Dataset,
    full: bool,
    k: int,
    microbatch_size: int,
    schedule: Any,
    criterion: dict,
    common: dict,
) -> list[keras.callbacks.Callback]:
    """The "paper" callbacks (and "full"'s `HessianSpectrum`) on `probe`."""
    gram = {
        "microbatch_size": microbatch_size,
        "schedule": schedule,
        "recorder": common["recorder"],
        "jit_compile": common["jit_compile"],
    }
    callbacks = [
        BreakEven(
            probe,
            k=k,
            num_iterations=20,
            tol=PAPER_TOL,
            schedule=schedule,
            **criterion,
            **common,
        ),
        GradientCovariance(
            probe, **gram, **({"blocks": "layer"} if full else {})
        ),
        GradientConfusion(probe, **gram),
    ]
    if full:
        callbacks.append(
            HessianSpectrum(
                probe,
                k=max(5, k),
                tol=PAPER_TOL,
                trace=True,
                smallest=True,
                density=True,
                alignment=True,
                probe_splits=min(FULL_PROBE_SPLITS, _num_examples(probe)),
                schedule=schedule,
                **common,
            )
        )
    return callbacks


# "full" reports the spread of lambda_1 over this many disjoint parts of
# its probe (fewer for a probe of fewer examples; `_microbatched` leaves at
# least two).
FULL_PROBE_SPLITS = 4


def _num_examples(probe: tf.data.Dataset) -> int:
    """Examples in a probe dataset of `(x, y[, w])` batches."""
    return sum(int(tf.shape(b[1])[0]) for b in probe)


def _microbatched(
    probe: tf.data.Dataset, microbatch_size: int | None
) -> tuple[tf.data.Dataset, int]:
    """The probe cut to a multiple of M, and M (default min(128, N / 8))."""
    size = _num_examples(probe)
    micro = microbatch_size or min(128, max(1, size // 8))
    usable = size - size % micro
    if usable < 2 * micro:
        raise ValueError(
            f"The probe set has {size} examples: too few for two "
            f"micro-batches of {micro}; use a larger probe set (the "
            "launcher's --probe_fraction) or a smaller `microbatch_size`."
        )
    if usable != size:
        probe = probe.unbatch().take(usable).batch(128).cache()
    return probe, micro


def _at_most(data: Any, size: int) -> int:
    if isinstance(data, tf.data.Dataset):
        return min(size, _count(data.unbatch()))
    return min(size, len(tf.nest.flatten(data[1])[0]))
