"""Gradient confusion at initialization, in the regime of the theory.

Sankararaman et al. (ICML 2020) bound gradient confusion for networks with
fan-in scaled Gaussian weights on inputs of unit norm. `measure` builds the
zoo MLP of a setting with `init="gaussian"` (N(0, 1/fan_in) weights, zero
biases) from the seed, draws the seed's examples on the unit sphere
(`sphere_data`, or a dataset's flattened images divided by their norm,
`dataset_data`), and returns the statistics of their gradients
(`tf_breakeven.gradient_statistics`, per example, or per micro-batch for
the BatchNorm comparison). Nothing is trained.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

STATISTICS = (
    "confusion/cos_min",
    "confusion/cos_mean",
    "confusion/cos_q05",
    "confusion/eta",
    "grad_cov/trace_over_lambda_1",
)


def sphere_data(
    num_examples: int, dim: int, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Points uniform on the unit sphere of R^dim, labelled by the argmax
    of a random linear teacher (both drawn from `seed`)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    teacher = rng.standard_normal((dim, num_classes))
    y = np.argmax(x @ teacher, axis=1)
    return x.astype(np.float32), y.astype(np.int32)


def dataset_data(
    name: str, num_examples: int, seed: int, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """`num_examples` training images of a dataset (seeded shuffle),
    flattened and projected on the unit sphere; also the class count."""
    from tf_breakeven.launch import data as data_lib

    spec = data_lib.load(
        name, batch_size=num_examples, seed=seed, data_dir=data_dir
    )
    if spec.num_train < num_examples:
        raise ValueError(
            f"{name} has {spec.num_train} training examples; "
            f"--init_examples={num_examples} needs at least as many."
        )
    x, y = next(iter(spec.train))
    x = np.reshape(x.numpy(), (num_examples, -1)).astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32), y.numpy().astype(np.int32), spec.num_classes


def measure(grid: Any, setting: dict, seed: int) -> dict[str, Any]:
    """The statistics of one setting at initialization.

    Args:
        grid: a `tf_breakeven.launch.papers.ConfusionScale`.
        setting: width, depth, arch ("plain" or "bn+skip"),
            microbatch_size.
        seed: initialization and data seed.

    Returns:
        `{"metrics": {key: value}, "num_parameters": int}`.
    """
    import tf_breakeven as tfb
    from tf_breakeven import models
    from tf_breakeven.launch import papers

    if grid.init_data == "sphere":
        x, y = sphere_data(
            grid.init_examples, grid.init_dim, grid.init_classes, seed
        )
        num_classes = grid.init_classes
    else:
        x, y, num_classes = dataset_data(
            grid.init_data,
            grid.init_examples,
            seed,
            grid.train.data_dir,
        )
    keras.utils.set_random_seed(seed)
    bn = setting["arch"] == papers.BN_SKIP
    model = models.get_model(
        "mlp",
        num_classes=num_classes,
        input_shape=x.shape[1:],
        width=setting["width"],
        depth=setting["depth"],
        init="gaussian",
        batch_norm=bn,
        skip_connections=bn,
    )
    stats = tfb.gradient_statistics(
        model,
        (x, y),
        microbatch_size=setting["microbatch_size"],
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras.backend.clear_session()
    return {
        "metrics": {key: float(stats[key]) for key in STATISTICS},
        "num_parameters": int(model.count_params()),
    }
