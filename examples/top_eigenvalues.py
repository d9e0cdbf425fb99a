"""Top Hessian eigenvalues and gradient noise of a small CNN, offline.

Trains a small CNN on scikit-learn's 8x8 handwritten digits (shipped with
scikit-learn, so this runs without internet) and prints, before and after a
short training run, the top Hessian eigenvalues on a probe set, the
stability threshold 2/eta and the gradient-covariance statistics.

    python examples/top_eigenvalues.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tf_breakeven as tfb  # noqa: E402

LEARNING_RATE = 0.05


def main() -> None:
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target.astype("int32")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    probe = (x[:256], y[:256])
    operator = tfb.HessianOperator(model, probe)
    print(f"model: {operator.dim} parameters; probe: 256 examples")
    print(f"stability threshold 2/eta = {2 / LEARNING_RATE:.1f}")

    def report(when: str) -> None:
        top = operator.eigenpairs(k=5).eigenvalues
        stats = tfb.gradient_statistics(model, probe, microbatch_size=16)
        print(f"\n{when}")
        print("  top-5 Hessian eigenvalues:", np.round(top, 3))
        print(f"  eta * lambda_1 = {LEARNING_RATE * top[0]:.3f}")
        for key in (
            "grad_cov/lambda_1",
            "grad_cov/trace_over_lambda_1",
            "confusion/cos_min",
            "grad/noise_scale",
        ):
            print(f"  {key} = {stats[key]:.4g}")

    report("at initialization")
    model.fit(x, y, batch_size=32, epochs=3, verbose=2)
    report("after 3 epochs of SGD")


if __name__ == "__main__":
    main()
