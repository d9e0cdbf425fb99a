"""Groups of a model's trainable variables: the blocks of per-layer numbers.

`variable_blocks(model, blocks)` names the blocks per-layer measurements
are reported for: the diagonal Hessian blocks of
`hessian_eigenpairs(..., blocks=...)` (`hessian/lambda_1/<block>`) and
the per-layer shares of Tr(K) (`grad_cov/trace/<block>`). A block is a list
of indices into `model.trainable_variables`, in that order.

* `blocks="layer"`: one block per top-level layer of the model
  (`model.layers`) that owns trainable variables, named after the layer. A
  nested model or a block layer counts as one layer. Variables no
  top-level layer owns (weights of a subclassed model itself) form a block
  named "other".
* a mapping `{name: variables}`: user-given groups; the variables are
  Keras variables of the model or their `.path` strings. A variable may
  belong to at most one block; variables in no block are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_breakeven.validation import ArgumentError

LAYER = "layer"
OTHER = "other"

BlocksLike = str | Mapping[str, Sequence[Any]]


def variable_blocks(
    model: keras.Model, blocks: BlocksLike
) -> dict[str, list[int]]:
    """`{block name: indices into model.trainable_variables}`, in order.

    Raises:
        ValueError: an unknown `blocks` string, an empty block, a variable
            that is not a trainable variable of the model, or one that is
            in two blocks.
    """
    variables = list(model.trainable_variables)
    index = {id(v): i for i, v in enumerate(variables)}
    if isinstance(blocks, str):
        if blocks != LAYER:
            raise ArgumentError(
                f"`blocks` must be {LAYER!r} or a mapping {{name: "
                f"variables}}; got {blocks!r}."
            )
        return _layer_blocks(model, index)
    if not isinstance(blocks, Mapping) or not blocks:
        raise ArgumentError(
            f"`blocks` must be {LAYER!r} or a non-empty mapping {{name: "
            f"[variables]}}; got {type(blocks).__name__}."
        )
    by_path = {v.path: i for i, v in enumerate(variables)}
    owner: dict[int, str] = {}
    result = {}
    for name, members in blocks.items():
        if isinstance(members, (str, keras.Variable, tf.Variable)):
            members = [members]
        indices = sorted({_index_of(m, index, by_path, name) for m in members})
        if not indices:
            raise ArgumentError(
                f"Block {name!r} is empty; give it at least one trainable "
                "variable of the model."
            )
        for i in indices:
            if i in owner:
                raise ArgumentError(
                    f"Variable {variables[i].path} is in blocks "
                    f"{owner[i]!r} and {name!r}; put each variable in at "
                    "most one block."
                )
            owner[i] = str(name)
        result[str(name)] = indices
    return result


def _index_of(member: Any, index: dict, by_path: dict, name: str) -> int:
    if isinstance(member, str):
        if member in by_path:
            return by_path[member]
    elif id(member) in index:
        return index[id(member)]
    raise ArgumentError(
        f"Block {name!r}: {getattr(member, 'path', member)!r} is not a "
        "trainable variable of the model; pass entries of "
        "`model.trainable_variables` or their `.path` strings."
    )


def _layer_blocks(model: keras.Model, index: dict) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    taken: set[int] = set()
    for layer in model.layers:
        indices = [
            index[id(v)]
            for v in layer.trainable_variables
            if id(v) in index and index[id(v)] not in taken
        ]
        if indices:
            taken.update(indices)
            result[layer.name] = sorted(indices)
    rest = [i for i in index.values() if i not in taken]
    if rest:
        name = OTHER
        while name in result:  # a layer named "other"
            name += "_"
        result[name] = sorted(rest)
    return result


def flat_columns(
    shapes: Sequence[tf.TensorShape], indices: Sequence[int]
) -> list[tuple[int, int]]:
    """`[start, stop)` ranges of the flattened parameter vector (variables
    in `shapes` order, as `linalg.flatten_tensors` lays them out) that
    hold the variables at `indices`."""
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + math.prod(shape))
    return [(offsets[i], offsets[i + 1]) for i in sorted(indices)]
