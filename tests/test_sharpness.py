"""Diagonal Hessian blocks, batch sharpness and gradient-Hessian alignment
against exact float64 references.

References never go through tf_breakeven: full Hessians come from
`tape.jacobian` of a plain gradient (`conftest.jacobian_hessian`), gradients
from `conftest.plain_gradient`, and, through normalization layers (where
second-order autodiff is wrong, docs/pitfalls.md#P1), from central finite
differences of the float64 gradient (`conftest.fd_hvp`). The rows and
columns of a block are computed here from the variable sizes.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    assert_unchanged,
    build,
    cast_inputs,
    data_for,
    fd_hvp,
    flat,
    jacobian_hessian,
    plain_gradient,
    rel_err,
    snapshot,
    unflat,
)

import tf_breakeven as tfb
from tf_breakeven.hessian import BlockHessianOperator, HessianOperator
from tf_breakeven.sharpness import batch_sharpness, gradient_alignment

CURVATURE = "hessian/gradient_curvature"
IN_TOP_K = "hessian/gradient_in_top_k"
METHODS = ["forward_over_backward", "backward_over_backward"]


# --------------------------------------------------------------- helpers


def _probe(name, n=8, seed=0, weighted=False):
    x, y = data_for(name, n=n, seed=seed)
    x = cast_inputs(x, "float64")
    if not weighted:
        return x, y, None
    w = np.random.default_rng(seed + 100).uniform(0.3, 2.0, size=n)
    return x, y, w


def _data(x, y, w):
    return (x, y) if w is None else (x, y, w)


def _offsets(model):
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    return np.concatenate([[0], np.cumsum(sizes)])


def _variable_indices(model, variables):
    """Positions in model.trainable_variables, in model order."""
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return sorted(position[id(v)] for v in variables)


def _columns(model, indices):
    """Rows/columns of the flat parameter vector held by those variables."""
    offsets = _offsets(model)
    return np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i in sorted(indices)]
    )


def _layer_blocks(model):
    """{layer name: variable indices} for every layer with weights."""
    return {
        layer.name: _variable_indices(model, layer.trainable_variables)
        for layer in model.layers
        if layer.trainable_variables
    }


def _block_vector(model, indices, values):
    """`values` (flat, the block's length) as tensors shaped like the
    block's variables."""
    out, start = [], 0
    for i in sorted(indices):
        shape = model.trainable_variables[i].shape
        size = int(np.prod(shape))
        out.append(values[start : start + size].reshape(shape))
        start += size
    assert start == values.size
    return out


def _embed(model, cols, block_values):
    """A full flat vector that is `block_values` on `cols`, zero elsewhere."""
    full = np.zeros(_offsets(model)[-1])
    full[cols] = block_values
    return full


def _check_block_pairs(pairs, reference, k, block_shapes):
    """Top-k eigenpairs of a block against eigh of its exact matrix."""
    exact = np.linalg.eigvalsh(reference)[::-1]
    scale = np.abs(exact).max()
    count = min(k, reference.shape[0])
    assert pairs.eigenvalues.shape == (count,)
    np.testing.assert_allclose(
        pairs.eigenvalues, exact[:count], rtol=0, atol=1e-9 * scale
    )
    assert len(pairs.eigenvectors) == count
    for lam, u in zip(pairs.eigenvalues, pairs.eigenvectors):
        assert [tuple(t.shape) for t in u] == block_shapes
        u = flat(u)
        assert abs(np.linalg.norm(u) - 1) < 1e-10
        assert np.linalg.norm(reference @ u - lam * u) < 1e-7 * scale


def _batch_quotient(model, x, y, w):
    """g^T H g / ||g||^2 of the mean loss on one batch, exact float64."""
    params = model.trainable_variables
    g = plain_gradient(model, params, x, y, True, w)
    hessian = jacobian_hessian(model, x, y, True, w)
    return float(g @ hessian @ g / (g @ g))


def _slice(a, start, stop):
    return None if a is None else a[start:stop]


def _reference_batch_sharpness(model, x, y, w, batch_size):
    n = len(y)
    quotients = [
        _batch_quotient(
            model,
            x[a : a + batch_size],
            y[a : a + batch_size],
            _slice(w, a, a + batch_size),
        )
        for a in range(0, n - batch_size + 1, batch_size)
    ]
    return float(np.mean(quotients)), quotients


# ------------------------------------------- diagonal Hessian blocks


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "mlp_l2", "cnn"])
def test_layer_block_eigenpairs_match_eigh_of_the_exact_diagonal_blocks(
    name, method
):
    model = build(name, "float64")
    x, y, _ = _probe(name)
    hessian = jacobian_hessian(model, x, y, training=True)
    before = snapshot(model)
    largest_block = max(
        _columns(model, idx).size for idx in _layer_blocks(model).values()
    )
    pairs = tfb.hessian_eigenpairs(
        model,
        (x, y),
        k=3,
        tol=0.0,
        num_iterations=largest_block,  # clipped to each block's size
        method=method,
        blocks="layer",
    )
    assert_unchanged(before, snapshot(model))
    expected = _layer_blocks(model)
    assert list(pairs) == list(expected)
    for block, indices in expected.items():
        cols = _columns(model, indices)
        shapes = [tuple(model.trainable_variables[i].shape) for i in indices]
        _check_block_pairs(pairs[block], hessian[np.ix_(cols, cols)], 3, shapes)


def test_layer_blocks_with_the_default_iterations_give_the_top_eigenvalues():
    # The cnn's conv block (57 parameters) is larger than the default 30
    # Lanczos steps; the top 3 still converge to the exact block values.
    model = build("cnn", "float64")
    x, y, _ = _probe("cnn")
    hessian = jacobian_hessian(model, x, y, training=True)
    values = tfb.hessian_eigenvalues(
        model, (x, y), k=3, tol=0.0, blocks="layer"
    )
    for block, indices in _layer_blocks(model).items():
        cols = _columns(model, indices)
        exact = np.linalg.eigvalsh(hessian[np.ix_(cols, cols)])[::-1][:3]
        np.testing.assert_allclose(
            values[block], exact, rtol=0, atol=1e-8 * np.abs(exact).max()
        )


@pytest.mark.parametrize("method", METHODS)
def test_mapping_blocks_by_variables_and_paths_with_sample_weights(method):
    # Blocks given as Keras variables and as .path strings, not in model
    # order and not covering every variable; a block smaller than k gives
    # all its eigenvalues. Weighted losses and L2 regularization included.
    model = build("mlp_l2", "float64")
    x, y, w = _probe("mlp_l2", n=10, weighted=True)
    hessian = jacobian_hessian(model, x, y, training=True, sample_weight=w)
    k0, b0, k1, b1 = model.trainable_variables
    blocks = {"kernels": [k1.path, k0], "output_bias": [b1]}
    before = snapshot(model)
    values = tfb.hessian_eigenvalues(
        model, (x, y, w), k=5, tol=0.0, method=method, blocks=blocks
    )
    pairs = tfb.hessian_eigenpairs(
        model, (x, y, w), k=5, tol=0.0, method=method, blocks=blocks
    )
    assert_unchanged(before, snapshot(model))
    assert list(values) == ["kernels", "output_bias"]
    cases = {
        "kernels": _variable_indices(model, [k0, k1]),
        "output_bias": _variable_indices(model, [b1]),
    }
    for block, indices in cases.items():
        cols = _columns(model, indices)
        reference = hessian[np.ix_(cols, cols)]
        exact = np.linalg.eigvalsh(reference)[::-1][:5]
        np.testing.assert_allclose(
            values[block], exact, rtol=0, atol=1e-9 * np.abs(exact).max()
        )
        shapes = [tuple(model.trainable_variables[i].shape) for i in indices]
        _check_block_pairs(pairs[block], reference, 5, shapes)
    assert values["output_bias"].size == 3  # fewer than k parameters


def test_start_vector_with_blocks_raises_value_error():
    model = build("mlp", "float64")
    x, y, _ = _probe("mlp")
    start = unflat(np.ones(_offsets(model)[-1]), model)
    with pytest.raises(ValueError, match="start_vector"):
        tfb.hessian_eigenpairs(
            model, (x, y), k=1, blocks="layer", start_vector=start
        )
    with pytest.raises(ValueError, match="start_vector"):
        tfb.hessian_eigenvalues(
            model, (x, y), k=1, blocks="layer", start_vector=start
        )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp_l2", "cnn"])
def test_block_operator_matvec_gradient_and_curvature_match_exact_rows(
    name, method
):
    model = build(name, "float64")
    x, y, w = _probe(name, n=6, weighted=True)
    hessian = jacobian_hessian(model, x, y, training=True, sample_weight=w)
    gradient = plain_gradient(model, model.trainable_variables, x, y, True, w)
    rng = np.random.default_rng(7)
    before = snapshot(model)
    for indices in _layer_blocks(model).values():
        # The first layer's kernel alone, and each layer's variables.
        for block in (indices[:1], indices):
            cols = _columns(model, block)
            op = BlockHessianOperator(model, (x, y, w), block, method=method)
            assert op.dim == cols.size
            v = rng.normal(size=cols.size)
            hv = flat(op.matvec(_block_vector(model, block, v)))
            assert rel_err(hv, hessian[np.ix_(cols, cols)] @ v) < 1e-10
            assert rel_err(flat(op.gradient()), gradient[cols]) < 1e-12
            # e^T H_i e for e in the block: H_i of example i's weighted
            # loss (plus the regularization), from its own exact Hessian.
            e = rng.normal(size=cols.size)
            e_full = _embed(model, cols, e)
            reference = np.array(
                [
                    e_full
                    @ jacobian_hessian(
                        model,
                        x[i : i + 1],
                        y[i : i + 1],
                        training=True,
                        sample_weight=w[i : i + 1],
                    )
                    @ e_full
                    for i in range(len(y))
                ]
            )
            curvature = op.directional_curvature(
                _block_vector(model, block, e)
            ).numpy()
            assert rel_err(curvature, reference) < 1e-10
            assert abs(
                curvature.mean() - e @ hessian[np.ix_(cols, cols)] @ e
            ) < (1e-10 * np.abs(reference).max())
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize(
    "name,training",
    [("layer_norm", True), ("cnn_bn", True), ("cnn_bn", False)],
    ids=str,
)
def test_block_matvec_through_normalization_matches_finite_differences(
    name, training
):
    model = build(name, "float64", seed=3)
    x, y, w = _probe(name, n=6, weighted=True)
    rng = np.random.default_rng(11)
    before = snapshot(model)
    for block, indices in _layer_blocks(model).items():
        cols = _columns(model, indices)
        v = rng.normal(size=cols.size)
        reference = fd_hvp(
            model, x, y, _embed(model, cols, v), training, sample_weight=w
        )[cols]
        op = BlockHessianOperator(model, (x, y, w), indices, training=training)
        hv = flat(op.matvec(_block_vector(model, indices, v)))
        assert rel_err(hv, reference) < 1e-6, block
    assert_unchanged(before, snapshot(model))


def test_layer_norm_block_eigenvalues_match_finite_difference_blocks():
    # Each block's matrix column by column from finite differences of the
    # float64 gradient along unit vectors of the block.
    name = "layer_norm"
    model = build(name, "float64", seed=3)
    x, y, _ = _probe(name, n=6)
    blocks = _layer_blocks(model)
    before = snapshot(model)
    values = tfb.hessian_eigenvalues(
        model, (x, y), k=4, tol=0.0, num_iterations=40, blocks="layer"
    )
    assert_unchanged(before, snapshot(model))
    assert list(values) == list(blocks)
    dim = _offsets(model)[-1]
    for block, indices in blocks.items():
        cols = _columns(model, indices)
        columns = []
        for c in cols:
            unit = np.zeros(dim)
            unit[c] = 1.0
            columns.append(fd_hvp(model, x, y, unit, True)[cols])
        reference = np.array(columns).T
        reference = (reference + reference.T) / 2
        exact = np.linalg.eigvalsh(reference)[::-1][:4]
        np.testing.assert_allclose(
            values[block], exact, rtol=0, atol=1e-6 * np.abs(exact).max()
        )


def test_probe_gradient_of_a_weighted_dataset_matches_the_plain_gradient():
    model = build("mlp_l2", "float64")
    x, y, w = _probe("mlp_l2", n=11, weighted=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)
    reference = plain_gradient(model, model.trainable_variables, x, y, True, w)
    for method in METHODS:
        op = HessianOperator(model, dataset, method=method)
        assert rel_err(flat(op.gradient()), reference) < 1e-12
    op = HessianOperator(model, (x, y, w), training=False)
    inference = plain_gradient(model, model.trainable_variables, x, y, False, w)
    assert rel_err(flat(op.gradient()), inference) < 1e-12


# ------------------------------------------------------- batch sharpness


@pytest.mark.parametrize(
    "name,weighted",
    [("mlp", False), ("mlp", True), ("mlp_l2", True), ("cnn", False)],
    ids=str,
)
def test_batch_sharpness_is_the_mean_of_exact_per_batch_quotients(
    name, weighted
):
    # 10 examples in batches of 4: two batches, the last 2 examples left out.
    model = build(name, "float64")
    x, y, w = _probe(name, n=10, weighted=weighted)
    expected, quotients = _reference_batch_sharpness(model, x, y, w, 4)
    assert len(quotients) == 2
    before = snapshot(model)
    value = batch_sharpness(model, _data(x, y, w), 4)
    assert_unchanged(before, snapshot(model))
    assert isinstance(value, float)
    assert abs(value - expected) <= 1e-8 * abs(expected)
    # Not the full-probe quotient nor one of a whole-probe batch:
    # the batches really are separate.
    full = _batch_quotient(model, x[:8], y[:8], _slice(w, 0, 8))
    assert abs(full - expected) > 1e-4 * abs(expected)


def test_batch_sharpness_with_batch_size_one_and_the_whole_probe():
    model = build("mlp_l2", "float64")
    x, y, w = _probe("mlp_l2", n=5, weighted=True)
    expected, _ = _reference_batch_sharpness(model, x, y, w, 1)
    value = batch_sharpness(model, (x, y, w), 1)
    assert abs(value - expected) <= 1e-8 * abs(expected)
    whole = _batch_quotient(model, x, y, w)
    value = batch_sharpness(model, (x, y, w), 5)
    assert abs(value - whole) <= 1e-8 * abs(whole)


def test_batch_sharpness_regroups_a_dataset_of_batches_of_another_size():
    # 11 examples in dataset batches of 3; mini-batches of 4 span dataset
    # batches: [0, 4), [4, 8); examples 8..10 are left out.
    model = build("mlp", "float64")
    x, y, w = _probe("mlp", n=11, weighted=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(3)
    expected, quotients = _reference_batch_sharpness(model, x, y, w, 4)
    assert len(quotients) == 2
    value = batch_sharpness(model, dataset, 4)
    assert abs(value - expected) <= 1e-8 * abs(expected)
    unweighted = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    expected, _ = _reference_batch_sharpness(model, x, y, None, 5)
    value = batch_sharpness(model, unweighted, 5)
    assert abs(value - expected) <= 1e-8 * abs(expected)


def test_batch_sharpness_ignores_the_examples_after_the_last_whole_batch():
    model = build("mlp", "float64")
    x, y, w = _probe("mlp", n=10, weighted=True)
    expected, _ = _reference_batch_sharpness(model, x[:8], y[:8], w[:8], 4)
    x2, y2, w2 = x.copy(), y.copy(), w.copy()
    x2[8:] = 100.0
    y2[8:] = (y2[8:] + 1) % 3
    w2[9] = np.nan
    value = batch_sharpness(model, (x2, y2, w2), 4)
    assert abs(value - expected) <= 1e-8 * abs(expected)


@pytest.mark.parametrize("batch_size", [11, 0, -2])
def test_batch_sharpness_rejects_batch_sizes_without_a_whole_batch(
    batch_size,
):
    model = build("mlp", "float64")
    x, y, _ = _probe("mlp", n=10)
    with pytest.raises(ValueError, match="batch_size"):
        batch_sharpness(model, (x, y), batch_size)


def test_batch_sharpness_is_nan_for_a_nan_weight_or_a_zero_gradient():
    model = build("mlp", "float64")
    x, y, w = _probe("mlp", n=8, weighted=True)
    finite, _ = _reference_batch_sharpness(model, x, y, w, 4)
    assert np.isfinite(finite)
    w_nan = w.copy()
    w_nan[5] = np.nan
    assert np.isnan(batch_sharpness(model, (x, y, w_nan), 4))
    # One batch with zero weights: zero gradient, 0 / 0.
    w_zero = w.copy()
    w_zero[:4] = 0.0
    assert np.isnan(batch_sharpness(model, (x, y, w_zero), 4))


# ------------------------------------------- gradient-Hessian alignment


def _alignment_case(name="mlp_l2", weighted=True):
    model = build(name, "float64", seed=4)
    x, y, w = _probe(name, n=12, seed=4, weighted=weighted)
    g = plain_gradient(model, model.trainable_variables, x, y, True, w)
    hessian = jacobian_hessian(model, x, y, training=True, sample_weight=w)
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    return model, _data(x, y, w), g, hessian, eigenvalues, eigenvectors


def _reference_alignment(g, hessian, top):
    squared = g @ g
    return g @ hessian @ g / squared, np.sum((top.T @ g) ** 2) / squared


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_alignment_matches_eigh_of_the_exact_hessian(k, weighted):
    model, data, g, hessian, values, vectors = _alignment_case(
        weighted=weighted
    )
    # The top-k eigenspace is well separated from the rest.
    gap = (values[-k] - values[-k - 1]) / abs(values[-1])
    assert gap > 1e-3
    curvature, inside = _reference_alignment(g, hessian, vectors[:, -k:])
    before = snapshot(model)
    result = gradient_alignment(model, data, k, tol=0.0)
    assert_unchanged(before, snapshot(model))
    assert set(result) == {CURVATURE, IN_TOP_K}
    assert abs(result[CURVATURE] - curvature) <= 1e-10 * abs(curvature)
    assert abs(result[IN_TOP_K] - inside) <= 1e-8 * inside
    assert 0 < result[IN_TOP_K] <= 1 + 1e-12


def test_gradient_alignment_with_given_eigenvectors_is_exact():
    model, data, g, hessian, _, vectors = _alignment_case()
    for k in (1, 3):
        top = vectors[:, ::-1][:, :k]
        given = [unflat(top[:, j], model) for j in range(k)]
        result = gradient_alignment(model, data, k, eigenvectors=given)
        curvature, inside = _reference_alignment(g, hessian, top)
        assert abs(result[CURVATURE] - curvature) <= 1e-10 * abs(curvature)
        assert abs(result[IN_TOP_K] - inside) <= 1e-10 * inside
    # Any orthonormal vectors are used as given (no Lanczos run): the share
    # of g in the span of two random directions.
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(g.size, 2)))
    given = [unflat(basis[:, j], model) for j in range(2)]
    result = gradient_alignment(model, data, 2, eigenvectors=given)
    _, inside = _reference_alignment(g, hessian, basis)
    assert abs(result[IN_TOP_K] - inside) <= 1e-10 * inside


def test_gradient_alignment_accepts_tensors_from_hessian_eigenpairs():
    model, data, g, hessian, _, vectors = _alignment_case()
    pairs = tfb.hessian_eigenpairs(model, data, k=2, tol=1e-10)
    result = gradient_alignment(model, data, eigenvectors=pairs.eigenvectors)
    curvature, inside = _reference_alignment(g, hessian, vectors[:, -2:])
    assert abs(result[CURVATURE] - curvature) <= 1e-10 * abs(curvature)
    assert abs(result[IN_TOP_K] - inside) <= 1e-7 * inside


def test_gradient_alignment_of_a_zero_gradient_is_nan():
    # All sample weights zero and no regularization: g = 0 and H = 0.
    model = build("mlp", "float64")
    x, y, _ = _probe("mlp", n=6)
    zero = np.zeros(6)
    assert np.all(
        plain_gradient(model, model.trainable_variables, x, y, True, zero) == 0
    )
    result = gradient_alignment(model, (x, y, zero), 1, tol=0.0)
    assert np.isnan(result[CURVATURE]) and np.isnan(result[IN_TOP_K])
    basis = np.eye(_offsets(model)[-1])[:, :2]
    given = [unflat(basis[:, j], model) for j in range(2)]
    result = gradient_alignment(model, (x, y, zero), eigenvectors=given)
    assert np.isnan(result[CURVATURE]) and np.isnan(result[IN_TOP_K])


@pytest.mark.parametrize(
    "case",
    ["a flat vector", "a variable missing", "a transposed kernel", "none"],
)
def test_gradient_alignment_rejects_wrongly_shaped_eigenvectors(case):
    model = build("mlp", "float64")
    x, y, _ = _probe("mlp", n=6)
    u = np.zeros(_offsets(model)[-1])
    u[0] = 1.0
    good = unflat(u, model)
    eigenvectors = {
        "a flat vector": [u],
        "a variable missing": [good[:-1]],
        "a transposed kernel": [[good[0].T] + good[1:]],
        "none": [],
    }[case]
    with pytest.raises(ValueError):
        gradient_alignment(model, (x, y), eigenvectors=eigenvectors)
