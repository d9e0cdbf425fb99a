"""Gram matrices of sample gradients without sample gradients ("ghost").

For a layer whose kernel W enters the loss only through z = op(x, W) with
op linear in W and summing over positions (a matmul or einsum over a
sequence, a convolution over patches, an embedding lookup), the gradient of
sample i is a sum of outer products, g_i = sum_p a_ip (x) b_ip, of the
op's inputs a_ip (for a convolution: patches) and the back-propagated
gradients b_ip = dL_i/dz_ip. Its part of the Gram matrix is therefore

    <g_i, g_j> = sum_{p, q} (a_ip . a_jq) (b_ip . b_jq),

a product of input Grams and output-gradient Grams, and with one position
(Dense on vectors) simply (a_i . a_j)(b_i . b_j). All of it comes from one
vectorized forward and backward pass that stops at the z's: no per-sample
gradient of W is formed. Each layer's part is computed by whichever is
cheaper for its shapes (`layer_method`): this "ghost" product, with a cost
of (n P)^2 (d_in + d_out) for n samples of P positions, or the layer's own
per-sample gradients sum_p a_ip b_ip^T, formed one layer at a time
(n P d_in d_out, memory n d_in d_out).

How the inputs and output gradients are found: while the model runs
(`Recorder`), the Keras TensorFlow backend's `matmul`, `einsum`, `conv`
and `take` are wrapped; a call whose kernel operand is one of the model's
trainable variables is computed with `stop_gradient(W)` and its input and
output are recorded. A variable that reaches the loss any other way
(weight tying, a custom layer, LoRA) is found when the function is traced:
the data loss still has a gradient with respect to it, and the variable is
then measured with the other variables. The other variables (biases,
normalization scales, position embeddings, recurrent layers that run a
`tf.while_loop`) keep their sample gradients, computed in the same
vectorized pass; they are small.

A weight regularizer's gradient r_W is the same for every sample; its
cross terms <D_i, r_W> = sum_p a_ip^T r_W b_ip are added exactly.

Every sample is run as its own batch by `gradients.map_samples`, exactly
like the materialized engine, so dropout masks, BatchNormalization batch
statistics (the coupling of a micro-batch lives in its b's) and sample
weights are those of `gradients.SampleRows`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf
from absl import logging
from keras.src.backend.tensorflow import nn as _keras_tf_nn
from keras.src.backend.tensorflow import numpy as _keras_tf_numpy

GHOST = "ghost"
MATERIALIZE = "materialize"
SPARSE = "sparse"  # embeddings outside XLA: only pairs sharing a token
# The sample count the per-layer choice assumes when it is unknown while
# tracing (a train step's batch of unknown size).
ASSUMED_SAMPLES = 128


@dataclasses.dataclass
class Call:
    """One recorded call of a tapped op on a trainable variable.

    Attributes:
        kind: "matmul", "einsum", "conv" or "take".
        inputs: the op's input (for "take": the indices).
        outputs: the op's output z (its gradient is b).
        options: static arguments (einsum layout, conv geometry).
    """

    kind: str
    inputs: tf.Tensor
    outputs: tf.Tensor
    options: dict


class Untapped(Exception):
    """Raised while tracing: variables that reach the loss untapped."""

    def __init__(self, indices: Sequence[int]):
        super().__init__(f"untapped variables {sorted(indices)}")
        self.indices = set(indices)


def _einsum_layout(subscripts: str, x_rank: int) -> dict | None:
    """How `x, W -> z` of an einsum maps to positions and kernel axes.

    None unless it is a dense projection: the first axis of x is the batch
    (kept first in z), every other axis of x is either contracted with W or
    a position kept in z, and W's other axes appear only in z.
    """
    if "..." in subscripts or "->" not in subscripts:
        return None
    inputs, out = subscripts.replace(" ", "").split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    xs, ks = parts
    if len(xs) != x_rank or any(
        s.count(c) > 1 for s in (xs, ks, out) for c in s
    ):
        return None
    if not xs or xs[0] in ks or not out or out[0] != xs[0]:
        return None
    k_in = [c for c in ks if c in xs]
    k_out = [c for c in ks if c in out]
    if set(k_in) & set(k_out) or set(k_in) & set(out):
        return None
    if len(k_in) + len(k_out) != len(ks):
        return None
    positions = [c for c in xs[1:] if c not in ks]
    if sorted(positions) != sorted(c for c in out[1:] if c not in ks):
        return None
    grouped = [*k_in, *k_out]
    return {
        "x_order": [xs.index(c) for c in [xs[0], *positions, *k_in]],
        "z_order": [out.index(c) for c in [out[0], *positions, *k_out]],
        "k_in": len(k_in),
        "k_out": len(k_out),
        # kernel axes in (k_in, k_out) order, and back to the kernel's own
        "grouped_axes": [ks.index(c) for c in grouped],
        "kernel_axes": [grouped.index(c) for c in ks],
    }


def _conv_options(x, kernel, strides, padding, data_format, dilation):
    rank = len(kernel.shape) - 2
    if rank not in (1, 2) or str(padding).lower() not in ("valid", "same"):
        return None
    channels_first = data_format == "channels_first"
    channels = x.shape[1] if channels_first else x.shape[-1]
    if channels is None or channels != kernel.shape[-2]:
        return None  # grouped or depthwise

    def tup(v):
        v = [v] * rank if isinstance(v, int) else list(v)
        return v if len(v) == rank else None

    strides, dilation = tup(strides), tup(dilation)
    if strides is None or dilation is None:
        return None
    return {
        "rank": rank,
        "size": list(kernel.shape[:rank]),
        "strides": strides,
        "dilation": dilation,
        "padding": str(padding).upper(),
        "channels_first": channels_first,
    }


class Recorder:
    """Taps the backend ops whose kernel operand is an allowed variable.

    Args:
        variables: the model's trainable variables (in order).
        allowed: indices of the variables that may be tapped.
        tape: the `tf.GradientTape` recording the forward pass; it watches
            every tapped output (an output computed from the model's input
            and a stopped kernel is otherwise not on the tape).
    """

    def __init__(
        self,
        variables: Sequence[Any],
        allowed: set[int],
        tape: tf.GradientTape | None = None,
    ):
        self.index = {id(v): i for i, v in enumerate(variables) if i in allowed}
        self.tape = tape
        self.calls: dict[int, list[Call]] = {}

    def _variable(self, operand: Any) -> int | None:
        return self.index.get(id(operand))

    def _record(self, i, kind, x, kernel, compute, options):
        stopped = tf.stop_gradient(tf.convert_to_tensor(kernel))
        z = compute(stopped)
        if self.tape is not None:
            self.tape.watch(z)
        self.calls.setdefault(i, []).append(Call(kind, x, z, options))
        return z

    @contextlib.contextmanager
    def active(self) -> Iterator[Recorder]:
        """Installs the taps while the model is called.

        This method is long because the four wrapped backend functions
        must be installed and restored together.
        """
        nn, np_ = _keras_tf_nn, _keras_tf_numpy
        matmul, einsum, take, conv = np_.matmul, np_.einsum, np_.take, nn.conv

        def tapped_matmul(x1, x2):
            i = self._variable(x2)
            x = tf.convert_to_tensor(x1) if i is not None else None
            if i is None or len(x2.shape) != 2 or x.shape.rank < 2:
                return matmul(x1, x2)
            return self._record(i, "matmul", x, x2, lambda w: matmul(x, w), {})

        def tapped_einsum(subscripts, *operands, **kwargs):
            i = self._variable(operands[-1]) if len(operands) == 2 else None
            layout = None
            if i is not None and not kwargs:
                x = tf.convert_to_tensor(operands[0])
                layout = _einsum_layout(subscripts, x.shape.rank)
            if layout is None:
                return einsum(subscripts, *operands, **kwargs)
            return self._record(
                i,
                "einsum",
                x,
                operands[1],
                lambda w: einsum(subscripts, x, w),
                layout,
            )

        def tapped_take(x, indices, axis=None):
            i = self._variable(x)
            if i is None or axis != 0 or len(x.shape) != 2:
                return take(x, indices, axis=axis)
            ids = tf.convert_to_tensor(indices)
            return self._record(
                i, "take", ids, x, lambda w: take(w, ids, axis=0), {}
            )

        def tapped_conv(
            inputs,
            kernel,
            strides=1,
            padding="valid",
            data_format=None,
            dilation_rate=1,
        ):
            i = self._variable(kernel)
            args = (strides, padding, data_format, dilation_rate)
            x = tf.convert_to_tensor(inputs)
            options = None
            if i is not None:
                options = _conv_options(x, kernel, *args)
            if options is None:
                return conv(inputs, kernel, *args)
            return self._record(
                i, "conv", x, kernel, lambda w: conv(x, w, *args), options
            )

        saved = [(np_, "matmul", matmul), (np_, "einsum", einsum)]
        saved += [(np_, "take", take), (nn, "conv", conv)]
        np_.matmul, np_.einsum, np_.take = (
            tapped_matmul,
            tapped_einsum,
            tapped_take,
        )
        nn.conv = tapped_conv
        try:
            yield self
        finally:
            for module, name, original in saved:
                setattr(module, name, original)


# Shaping the recorded tensors: every call becomes (a [n, P, d_in],
# b [n, P, d_out]) with n samples and P = M x positions, except "take",
# whose a is the indices [n, P]. n may be unknown while tracing (a train
# step's batch); P and the widths are always static.


def _flat(t: tf.Tensor, positions: int, width: int | None) -> tf.Tensor:
    if width is None:
        return tf.reshape(t, [-1, positions])
    return tf.reshape(t, [-1, positions, width])


def _positions(t: tf.Tensor, trailing: int) -> int:
    """Static positions per sample of t [n, M, ..., (trailing axes)]."""
    return math.prod(t.shape[1 : t.shape.rank - trailing])


def join_calls(tensors: Sequence[tf.Tensor], ids: bool):
    """Stacked tensors of several "matmul" or "take" calls of one kernel
    [n, M, ..., (width)] as one [n, P, width] (resp. ids [n, P]), P the
    positions of all calls; `shaped` takes it as one call of the same
    kind. The order of positions does not matter: every part sums over
    them."""
    trailing = 0 if ids else 1
    return tf.concat(
        [
            _flat(
                t,
                _positions(t, trailing),
                None if ids else t.shape[-1],
            )
            for t in tensors
        ],
        axis=1,
    )


def _patches(x: tf.Tensor, options: dict) -> tf.Tensor:
    """Convolution patches [N, out positions..., k x C] of x [N, ..., C]."""
    if options["channels_first"]:
        x = tf.transpose(x, [0, *range(2, x.shape.rank), 1])
    one_d = options["rank"] == 1
    if one_d:
        x = x[:, tf.newaxis]
    size, strides, rates = (
        ([1] if one_d else []) + list(options[key])
        for key in ("size", "strides", "dilation")
    )
    return tf.image.extract_patches(
        x,
        sizes=[1, *size, 1],
        strides=[1, *strides, 1],
        rates=[1, *rates, 1],
        padding=options["padding"],
    )


def _einsum_order(order: list[int]) -> list[int]:
    """An einsum layout's axis order for tensors with a leading sample
    axis: [n, M, ...] keeps n and M first."""
    return [0, 1] + [axis + 1 for axis in order[1:]]


def shaped(call_inputs, call_grads, kind: str, options: dict):
    """(a, b) of stacked call tensors [n, M, ...]: see the comment above."""
    if kind == "take":
        positions = _positions(call_inputs, 0)
        width = call_grads.shape[-1]
        return (
            _flat(call_inputs, positions, None),
            _flat(call_grads, positions, width),
        )
    if kind == "einsum":
        a = tf.transpose(call_inputs, _einsum_order(options["x_order"]))
        b = tf.transpose(call_grads, _einsum_order(options["z_order"]))
        d_in = math.prod(a.shape[a.shape.rank - options["k_in"] :])
        d_out = math.prod(b.shape[b.shape.rank - options["k_out"] :])
        positions = _positions(a, options["k_in"])
        return _flat(a, positions, d_in), _flat(b, positions, d_out)
    if kind == "conv":
        merged = tf.reshape(call_inputs, [-1, *call_inputs.shape[2:]])
        a = _patches(merged, options)
        b = call_grads
        if options["channels_first"]:
            b = tf.transpose(b, [0, 1, *range(3, b.shape.rank), 2])
        positions = _positions(b, 1)
        return (
            _flat(a, positions, a.shape[-1]),
            _flat(b, positions, b.shape[-1]),
        )
    positions = _positions(call_inputs, 1)
    return (
        _flat(call_inputs, positions, call_inputs.shape[-1]),
        _flat(call_grads, positions, call_grads.shape[-1]),
    )


# The per-layer parts of the Gram matrix, from (a, b) of every call of
# the layer's kernel joined along positions.


@dataclasses.dataclass(frozen=True)
class Layer:
    """A tapped kernel and the shapes that set its cost.

    Attributes:
        index: the variable's index in `model.trainable_variables`.
        kind: the op ("matmul", "einsum", "conv" or "take").
        options: the first call's static options (einsum layout, conv).
        shape: the variable's shape.
        n: samples (None when unknown while tracing: a train step's
            batch; the costs then assume `ASSUMED_SAMPLES`); positions: P,
            positions per sample over all calls.
        d_in, d_out: widths of a and b (for "take": vocabulary, width).
    """

    index: int
    kind: str
    options: dict
    shape: tuple
    n: int | None
    positions: int
    d_in: int
    d_out: int

    def costs(self) -> dict[str, tuple[float, float]]:
        """`{method: (multiply-adds, bytes)}` of the two ways."""
        n = self.n or ASSUMED_SAMPLES
        p, d_in, d_out = self.positions, self.d_in, self.d_out
        pairs = float(n * p) ** 2
        ghost_width = d_out + (1 if self.kind == "take" else d_in)
        rows = float(n) * d_in * d_out
        materialize = n * p * (d_out if self.kind == "take" else d_in * d_out)
        return {
            GHOST: (pairs * ghost_width, 16 * pairs),
            MATERIALIZE: (materialize + n * rows, 12 * rows),
        }


def layer_method(layer: Layer, memory_budget: float, jit: bool) -> str:
    """The cheaper way that fits `memory_budget` (else the smaller one).

    An embedding outside XLA always takes `SPARSE`: its cost is the
    number of (sample, sample) pairs sharing a token, at most the ghost
    product's, and it needs `tf.unique` (dynamic shapes, not in XLA).
    """
    costs = layer.costs()
    fitting = [m for m, (_, size) in costs.items() if size <= memory_budget]
    if layer.kind == "take" and not jit:
        method = SPARSE
    elif fitting:
        method = min(fitting, key=lambda m: costs[m][0])
    else:
        method = min(costs, key=lambda m: costs[m][1])
    logging.debug(
        "tf_breakeven ghost Gram: variable %d (%s, n=%s, P=%d, %dx%d): %s",
        layer.index,
        layer.kind,
        layer.n,
        layer.positions,
        layer.d_in,
        layer.d_out,
        method,
    )
    return method


def _pair_sum(products: tf.Tensor, p: int) -> tf.Tensor:
    """[nP, nP] -> [n, n], summing each sample pair's P x P block."""
    n = tf.shape(products)[0] // p
    blocks = tf.reshape(products, [n, p, n, p])
    return tf.reduce_sum(blocks, axis=[1, 3])


def _product_precision(t: tf.Tensor) -> tf.Tensor:
    """t in the precision its products run in: its own, at least float32."""
    return tf.cast(t, tf.float32) if t.dtype.size < 4 else t


def _self_products(t: tf.Tensor, width: int) -> tf.Tensor:
    """[nP, nP] inner products of the rows of t, float64.

    The products run in t's own precision (float32 for a float32 model:
    3x faster than float64 on CPU, and the rows are float32 to begin
    with); every sum over positions and layers after them is float64.
    """
    flat = _product_precision(tf.reshape(t, [-1, width]))
    return tf.cast(tf.matmul(flat, flat, transpose_b=True), tf.float64)


def _vocabulary_rows(ids, b, vocabulary: int) -> tf.Tensor:
    """Per-sample embedding gradients [n, V * d] (float64), by segments."""
    n = tf.shape(b)[0]
    segments = tf.range(n)[:, tf.newaxis] * vocabulary + ids
    rows = tf.math.unsorted_segment_sum(
        tf.reshape(b, [-1, b.shape[-1]]),
        tf.reshape(segments, [-1]),
        n * vocabulary,
    )
    return tf.reshape(tf.cast(rows, tf.float64), [n, -1])


def _shared_token_gram(layer: Layer, ids, b, memory_budget) -> tf.Tensor:
    """The embedding's Gram from the pairs of samples sharing a token.

    Sample i's gradient has one row per distinct token v it contains,
    E_iv = sum of its b's at v; G_ij = sum_v E_iv . E_jv runs over the
    pairs (i, v), (j, v) with i <= j only (G is symmetric), in chunks of
    pairs that fit the budget. The rows and their dot products run in
    `_product_precision`, like `_self_products`; the sums
    over tokens are float64.
    """
    n, (vocabulary, width) = tf.shape(b)[0], layer.shape
    keys = (
        tf.cast(ids, tf.int64)
        + vocabulary * tf.range(tf.cast(n, tf.int64))[:, tf.newaxis]
    )
    unique, position = tf.unique(tf.reshape(keys, [-1]))
    flat_b = _product_precision(tf.reshape(b, [-1, width]))
    rows = tf.math.unsorted_segment_sum(flat_b, position, tf.size(unique))
    # Keys are sample-major, and tf.unique keeps their first occurrence:
    # a stable sort by token leaves each token's samples ascending.
    order = tf.argsort(unique % vocabulary, stable=True)
    token = tf.gather(unique % vocabulary, order)
    sample = tf.cast(tf.gather(unique // vocabulary, order), tf.int32)
    rows = tf.gather(rows, order)
    pairs = tf.ragged.range(
        tf.range(tf.size(token)),
        tf.searchsorted(token, token, side="right"),
    )
    first, second = pairs.value_rowids(), tf.cast(pairs.flat_values, tf.int64)
    cell = tf.gather(sample, first) * n + tf.gather(sample, second)
    chunk = max(1, int(memory_budget) // (8 * flat_b.dtype.size * width))

    def add(start, upper):
        f, s = first[start : start + chunk], second[start : start + chunk]
        dots = tf.reduce_sum(tf.gather(rows, f) * tf.gather(rows, s), -1)
        return start + chunk, upper + tf.math.unsorted_segment_sum(
            tf.cast(dots, tf.float64), cell[start : start + chunk], n * n
        )

    _, upper = tf.while_loop(
        lambda start, _: start < tf.size(second, tf.int64),
        add,
        (tf.constant(0, tf.int64), tf.zeros([n * n], tf.float64)),
    )
    upper = tf.reshape(upper, [n, n])
    return (
        upper + tf.transpose(upper) - tf.linalg.diag(tf.linalg.diag_part(upper))
    )


# Each sample's kernel gradient sum_p a_ip b_ip^T, [n, d_in, d_out]. XLA
# compiles it on its own, even outside `jit_compile`: on CPU its batched
# product took 15 ms where TensorFlow's BatchMatMul took 40 (128 samples,
# an LSTM kernel's 128 positions, 64 x 256), and 77 against 119 ms for a
# 3x3 convolution of 64 channels over 64 positions (docs/pitfalls.md#P31).
_sample_kernel_gradients = tf.function(
    lambda a, b: tf.einsum("ipk,ipo->iko", a, b),
    jit_compile=True,
    autograph=False,
)


def layer_gram(
    layer: Layer, a, b, method: str, memory_budget: float = 2**31
) -> tf.Tensor:
    """<g_i, g_j> restricted to the layer's kernel, float64 [n, n]."""
    if layer.kind == "take":
        ids = tf.cast(a, tf.int32)
        if method == SPARSE:
            return _shared_token_gram(layer, ids, b, memory_budget)
        if method == MATERIALIZE:
            rows = _vocabulary_rows(ids, b, layer.d_in)
            return tf.matmul(rows, rows, transpose_b=True)
        flat_ids = tf.reshape(ids, [-1])
        same = tf.cast(
            tf.equal(flat_ids[:, tf.newaxis], flat_ids[tf.newaxis]),
            tf.float64,
        )
        products = same * _self_products(b, layer.d_out)
        return _pair_sum(products, layer.positions)
    if method == MATERIALIZE:
        rows = _sample_kernel_gradients(a, b)
        rows = tf.reshape(tf.cast(rows, tf.float64), [tf.shape(a)[0], -1])
        return tf.matmul(rows, rows, transpose_b=True)
    products = _self_products(a, layer.d_in) * _self_products(b, layer.d_out)
    if layer.positions == 1:
        return products
    return _pair_sum(products, layer.positions)


def _grouped(layer: Layer, tensor: tf.Tensor, leading: int) -> tf.Tensor:
    """A kernel-shaped tensor (after `leading` axes) as [.., d_in, d_out]."""
    if layer.kind == "einsum":
        axes = [leading + a for a in layer.options["grouped_axes"]]
        tensor = tf.transpose(tensor, [*range(leading), *axes])
    head = tensor.shape[:leading].as_list()
    return tf.reshape(tensor, [*head, layer.d_in, layer.d_out])


def _kernel_shaped(layer: Layer, tensor: tf.Tensor) -> tf.Tensor:
    """Inverse of `_grouped` for [k, d_in, d_out] -> [k, *shape]."""
    if layer.kind != "einsum":
        return tf.reshape(tensor, [-1, *layer.shape])
    axes = layer.options["grouped_axes"]
    grouped_shape = [layer.shape[a] for a in axes]
    tensor = tf.reshape(tensor, [-1, *grouped_shape])
    back = [1 + a for a in layer.options["kernel_axes"]]
    return tf.transpose(tensor, [0, *back])


def regularizer_terms(layer: Layer, a, b, r) -> tf.Tensor:
    """<D_i, r> for every sample, float64 [n] (D_i: the data gradient)."""
    if layer.kind == "take":
        picked = tf.gather(tf.cast(r, b.dtype), tf.cast(a, tf.int32))
        return tf.reduce_sum(tf.cast(picked * b, tf.float64), [1, 2])
    r = tf.cast(_grouped(layer, r, 0), tf.float64)
    projected = tf.einsum("ipk,ko->ipo", tf.cast(a, tf.float64), r)
    return tf.reduce_sum(projected * tf.cast(b, tf.float64), [1, 2])


def layer_combination(layer: Layer, a, b, coefficients) -> tf.Tensor:
    """sum_i c_ji D_i for every row j of `coefficients` [k, n], float64
    [k, *shape] (D_i: sample i's data gradient of the kernel)."""
    c = tf.cast(coefficients, tf.float64)
    b64 = tf.cast(b, tf.float64)
    if layer.kind == "take":
        weighted = tf.einsum("ji,ipd->ipjd", c, b64)
        vocabulary, width = layer.shape
        total = tf.math.unsorted_segment_sum(
            tf.reshape(weighted, [-1, c.shape[0], width]),
            tf.reshape(tf.cast(a, tf.int32), [-1]),
            vocabulary,
        )
        return tf.transpose(total, [1, 0, 2])
    total = tf.einsum("ji,ipk,ipo->jko", c, tf.cast(a, tf.float64), b64)
    return _kernel_shaped(layer, total)
