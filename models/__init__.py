"""Model zoo of the two papers, behind one registry.

    >>> from tf_breakeven import models
    >>> models.available()
    ['bert', 'densenet121', 'densenet_bc', 'lstm', 'mlp', 'resnet32', ...]
    >>> model = models.get_model("resnet32", num_classes=10)
    >>> tiny = models.get_model("resnet32", tiny=True)   # for tests

`get_model` returns an uncompiled Keras model whose output is logits (use
a loss with `from_logits=True`). Every model but `bert` is a functional
`ZooModel` whose `get_config()` is its builder arguments, so it saves,
loads and rebuilds from its config (see `tf_breakeven.models.base`); `bert` is a
keras-hub `BertTextClassifier`, which does the same in keras-hub's way.
`tiny=True` starts from a configuration of a few hundred to a few thousand
parameters on tiny inputs (`tiny_config(name)`); explicit keyword arguments
override it.

Registry names and what they are (details in each builder's docstring):

* simple_cnn: the Keras CIFAR-10 example, the break-even paper's SimpleCNN
  (`batch_norm=True`: SimpleCNN-BN).
* resnet32: He et al.'s CIFAR ResNet-32 (`depth=6n+2` for the others).
* wide_resnet: WRN-depth-width; `batch_norm=False, skip_connections=False`
  is the confusion paper's CNN-beta-ell.
* mlp: width x depth MLP; `activation="linear"` for deep linear networks.
* lstm: the IMDB LSTM, unrolled.
* bert: keras-hub BERT classifier (bert_base: 110M; `preset=` a directory).
* densenet121: DenseNet-121 for ImageNet.
* densenet_bc: DenseNet-BC for CIFAR (`depth`, `growth_rate`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from .base import ZooModel
from .bert import BERT_CONFIGS, bert_classifier
from .densenet import DenseNet, densenet_bc
from .lstm import LSTMClassifier
from .mlp import MLP
from .resnet import CifarResNet, ZeroPadShortcut
from .simple_cnn import SimpleCNN
from .wide_resnet import WideResNet

__all__ = [
    "BERT_CONFIGS",
    "MLP",
    "CifarResNet",
    "DenseNet",
    "LSTMClassifier",
    "SimpleCNN",
    "WideResNet",
    "ZeroPadShortcut",
    "ZooModel",
    "accepted_arguments",
    "available",
    "bert_classifier",
    "densenet_bc",
    "get_model",
    "register",
    "tiny_config",
]


class _Entry(NamedTuple):
    builder: Callable[..., keras.Model]
    tiny: dict


_REGISTRY: dict[str, _Entry] = {}


def register(
    name: str,
    builder: Callable[..., keras.Model],
    tiny: dict | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Adds `builder` (a class or function returning a model) as `name`.

    Args:
        name: registry name.
        builder: called with the keyword arguments of `get_model`.
        tiny: keyword arguments of the test-size configuration.
        overwrite: replace an existing entry instead of raising.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty str; got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"model {name!r} is already registered; pass `overwrite=True` "
            "to replace it."
        )
    if not callable(builder):
        raise ValueError(f"`builder` must be callable; got {builder!r}.")
    _REGISTRY[name] = _Entry(builder, dict(tiny or {}))


def available() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available())}"
        )
    return _REGISTRY[name]


def tiny_config(name: str) -> dict:
    """The keyword arguments `get_model(name, tiny=True)` starts from."""
    return dict(_entry(name).tiny)


def accepted_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments `get_model(name, ...)` accepts, sorted.

    The builder's named parameters (and, for a builder that passes
    `**kwargs` on to `keras.Model`, `name` and `trainable`).

    Raises:
        ValueError: unknown name.
    """
    builder = _entry(name).builder
    target = builder.__init__ if inspect.isclass(builder) else builder
    parameters = inspect.signature(target).parameters.values()
    names = {
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name != "self"
    }
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        names |= {"name", "trainable"}
    return tuple(sorted(names))


def get_model(name: str, *, tiny: bool = False, **kwargs: Any) -> keras.Model:
    """Builds the registered model `name` (uncompiled, fresh weights).

    Args:
        name: one of `available()`.
        tiny: start from `tiny_config(name)` (test size); `kwargs` override
            it.
        **kwargs: builder arguments (`num_classes`, `input_shape` or
            `vocabulary_size`/`sequence_length`, and the model's own; see
            the builder's docstring).

    Returns:
        An uncompiled, built `keras.Model` producing logits.

    Raises:
        ValueError: unknown name, unknown argument or bad argument value.
    """
    entry = _entry(name)
    arguments = {**entry.tiny, **kwargs} if tiny else dict(kwargs)
    accepted = accepted_arguments(name)
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for model {name!r}; accepted: "
            f"{', '.join(accepted)}"
        )
    return entry.builder(**arguments)


_TINY_IMAGE = {"num_classes": 3, "input_shape": (8, 8, 3)}

register(
    "simple_cnn",
    SimpleCNN,
    {
        "num_classes": 3,
        "input_shape": (10, 10, 3),
        "filters": (2, 4),
        "dense_units": 8,
    },
)
register(
    "resnet32", CifarResNet, {**_TINY_IMAGE, "depth": 8, "base_filters": 2}
)
register(
    "wide_resnet",
    WideResNet,
    {**_TINY_IMAGE, "depth": 10, "width": 2, "base_filters": 2},
)
register(
    "mlp",
    MLP,
    {"num_classes": 3, "input_shape": (4, 2), "width": 6, "depth": 3},
)
register(
    "lstm",
    LSTMClassifier,
    {
        "num_classes": 3,
        "vocabulary_size": 7,
        "sequence_length": 5,
        "embedding_dim": 3,
        "units": 4,
    },
)
register(
    "bert",
    bert_classifier,
    {
        "num_classes": 3,
        "vocabulary_size": 20,
        "num_layers": 1,
        "num_heads": 2,
        "hidden_dim": 4,
        "intermediate_dim": 8,
        "max_sequence_length": 6,
        "dropout": 0.0,
    },
)
register(
    "densenet121",
    DenseNet,
    {
        "num_classes": 3,
        "input_shape": (16, 16, 3),
        "blocks": (1, 1),
        "growth_rate": 2,
    },
)
register(
    "densenet_bc",
    densenet_bc,
    {**_TINY_IMAGE, "depth": 10, "growth_rate": 2},
)
