"""What every zoo model shares: a functional model that keeps its arguments.

A zoo model is a Keras functional model (so `summary`, `layers`, nested
layer access and `stateless_call` behave as for any functional model) whose
class is registered for serialization and whose `get_config()` returns the
arguments it was built from, not a layer graph. Hence:

* `type(model).from_config(model.get_config())` rebuilds the same
  architecture (fresh weights), and so do `keras.models.model_from_json`
  and `keras.saving.load_model` on a `.keras` file (weights restored);
* `keras.models.clone_model(model)` also works, but Keras rebuilds a custom
  functional class as a plain `keras.Model` with the same layers (Keras
  only keeps the class of models whose `__init__` takes
  `(inputs, outputs)`); use `from_config` to keep the class.

Layers take their dtype from the global policy
(`keras.config.set_dtype_policy`), like stock Keras layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from tf_breakeven.validation import ArgumentError, check_fraction, check_int

__all__ = [
    "PACKAGE",
    "ArgumentError",
    "ZooModel",
    "check_int",
    "check_ints",
    "check_rate",
    "check_shape",
]

PACKAGE = "tf_breakeven"


class ZooModel(keras.Model):
    """A functional model whose config is the arguments it was built from.

    Subclasses build their graph from keras.Input in `__init__`, then call
    `super().__init__(inputs, outputs, config=..., name=..., **kwargs)` with
    `config` the dict of their own constructor arguments.
    """

    def __init__(self, inputs: Any, outputs: Any, *, config: dict, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        # Set after the functional constructor: Keras forbids attributes
        # before it. A tuple of pairs avoids Keras' dict tracking wrapper.
        self._zoo_arguments = tuple(config.items())

    @property
    def zoo_arguments(self) -> dict:
        """The architecture arguments (constructor arguments but `name`)."""
        return dict(self._zoo_arguments)

    def get_config(self) -> dict:
        return {
            **self.zoo_arguments,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None):
        return cls(**config)


def check_rate(name: str, value: Any) -> float:
    """Returns a dropout rate in [0, 1), else raises ValueError."""
    return check_fraction(name, value, low_open=False, high_open=True)


def check_shape(
    name: str, value: Any, rank: int | None = None
) -> tuple[int, ...]:
    """Returns a static shape tuple (without batch axis), else ValueError."""
    if isinstance(value, (int, str)) or not isinstance(value, Sequence):
        raise ArgumentError(
            f"`{name}` must be a tuple of ints without the batch axis, e.g. "
            f"(32, 32, 3); got {value!r}."
        )
    shape = tuple(check_int(f"{name}[{i}]", d) for i, d in enumerate(value))
    if rank is not None and len(shape) != rank:
        raise ArgumentError(
            f"`{name}` must have {rank} entries (no batch axis); got {value!r}."
        )
    return shape


def check_ints(name: str, value: Any) -> tuple[int, ...]:
    """Returns a non-empty tuple of positive ints, else ValueError."""
    if isinstance(value, (int, str)) or not isinstance(value, Sequence):
        raise ArgumentError(f"`{name}` must be a tuple of ints; got {value!r}.")
    if not value:
        raise ArgumentError(f"`{name}` must not be empty.")
    return tuple(check_int(f"{name}[{i}]", v) for i, v in enumerate(value))
