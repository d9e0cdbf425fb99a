"""Verdicts on the papers' claims (tf_breakeven.launch.claims, papers,
verdicts), `ProbeLoss` and the measurement at initialization.

Every verdict test plants an effect (or none) in synthetic per-seed
numbers or records, so what the code must find is known without training.
"""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CLAIM_KEYS, cross_entropy

import tf_breakeven as tfb
from tf_breakeven import models
from tf_breakeven.launch import claims, initialization, papers, verdicts

SEEDS = range(4)


def _seeded(values):
    return dict(zip(SEEDS, values))


def test_compare_finds_a_planted_gap_and_its_size():
    lower = _seeded([1.0, 1.2, 0.9, 1.1])
    higher = _seeded([2.0, 2.3, 1.9, 2.1])
    result = claims.compare(lower, higher)
    assert result["verdict"] == claims.REPRODUCED
    lo, hi = np.array(list(lower.values())), np.array(list(higher.values()))
    pooled = math.sqrt((np.var(lo, ddof=1) + np.var(hi, ddof=1)) / 2)
    assert result["gap"] == pytest.approx(hi.mean() - lo.mean(), rel=1e-12)
    assert result["pooled_std"] == pytest.approx(pooled, rel=1e-12)
    assert result["separated"] == "as claimed"
    # The same numbers the other way round contradict the claim.
    assert claims.compare(higher, lower)["verdict"] == claims.NOT_REPRODUCED


def test_compare_calls_a_null_effect_and_a_thin_gap_inconclusive():
    rng = np.random.default_rng(0)
    same = claims.compare(
        _seeded(rng.normal(0, 1, 4)), _seeded(rng.normal(0, 1, 4))
    )
    assert same["verdict"] == claims.INCONCLUSIVE
    # Separated, but the gap is under two pooled standard deviations.
    thin = claims.compare(_seeded([0, 3, 3, 3.0]), _seeded([3.1, 3.1, 3.1, 6]))
    assert thin["separated"] == "as claimed"
    assert thin["gap"] < 2 * thin["pooled_std"]
    assert thin["verdict"] == claims.INCONCLUSIVE


def test_compare_drops_nan_seeds_and_needs_two_per_setting():
    result = claims.compare({0: 1.0, 1: math.nan}, {0: 2.0, 1: 3.0})
    assert result["lower"] == {0: 1.0}
    assert result["verdict"] == claims.INCONCLUSIVE
    assert math.isnan(result["gap"])


def test_combine_needs_every_comparison():
    r, n, i = claims.REPRODUCED, claims.NOT_REPRODUCED, claims.INCONCLUSIVE
    assert claims.combine([r, r]) == r
    assert claims.combine([r, i]) == i
    assert claims.combine([r, n]) == n
    assert claims.combine([]) == i


def test_value_at_loss_interpolates_at_the_first_crossing():
    losses = [2.0, 1.5, 1.0, 1.2, 0.5]
    values = [10.0, 20.0, 30.0, 0.0, 50.0]
    # 1.25 is crossed between 1.5 (20) and 1.0 (30): a quarter... half way.
    assert claims.value_at_loss(losses, values, 1.25) == pytest.approx(25.0)
    assert claims.value_at_loss(losses, values, 1.0) == pytest.approx(30.0)
    assert claims.value_at_loss(losses, values, 3.0) == 10.0  # starts below
    assert math.isnan(claims.value_at_loss(losses, values, 0.1))


def test_loss_levels_lie_where_every_run_has_been():
    levels = claims.loss_levels([[2.3, 1.0, 0.1], [2.2, 1.5, 0.8]], 3)
    assert len(levels) == 3
    assert all(0.8 < v < 2.2 for v in levels)
    assert levels == sorted(levels, reverse=True)
    assert claims.loss_levels([[2.0, 1.5], [1.0, 0.5]], 3) == []
    assert claims.loss_levels([], 3) == []
    assert claims.loss_levels([[2.0, 1.0], [math.nan]], 3) == []


def _trajectory(rate, offset, steps=30):
    """Loss falling at `rate`; the metric a function of the loss only
    (plus `offset`): at equal loss the two settings differ by `offset`."""
    losses = [2.3 * math.exp(-rate * t) for t in range(steps)]
    values = [1.0 + 3.0 * (2.3 - v) + offset for v in losses]
    return losses, values


def test_at_equal_loss_finds_what_equal_steps_would_reverse():
    # The claimed-higher setting trains 5x slower and is 0.5 higher at
    # every loss; at equal steps it is lower (its loss lags behind).
    slow = {s: _trajectory(0.02, 0.5 + 0.01 * s) for s in SEEDS}
    fast = {s: _trajectory(0.1, 0.01 * s) for s in SEEDS}
    at_step_10 = claims.compare(
        {s: v[1][10] for s, v in fast.items()},
        {s: v[1][10] for s, v in slow.items()},
    )
    assert at_step_10["verdict"] == claims.NOT_REPRODUCED
    result = claims.at_equal_loss(fast, slow)
    assert result["verdict"] == claims.REPRODUCED
    assert result["gap"] == pytest.approx(0.5, abs=1e-9)
    assert len(result["levels"]) == claims.NUM_LOSS_LEVELS
    null = claims.at_equal_loss(
        fast, {s: _trajectory(0.02, 0.01 * ((s + 2) % 4)) for s in SEEDS}
    )
    assert null["verdict"] == claims.INCONCLUSIVE


def _be_point(lr, batch, seed, lambda_h, lambda_k, offset, violated_at):
    """Records of a planted break-even run: lambda_H and lambda_K rise to
    their maxima; Tr(K)/lambda_K is a function of the loss plus
    `offset`; the stability ratio exceeds 1 from step `violated_at`."""
    records = []
    losses, ratios = _trajectory(0.1 * lr / batch * 32, offset, steps=20)
    for step in range(20):
        records.append(
            {
                "step": step * 10,
                papers.LAMBDA_H: lambda_h * min(1.0, step / 5),
                papers.LAMBDA_K: lambda_k * min(1.0, step / 5),
                papers.CONDITIONING: ratios[step],
                papers.PROBE_LOSS: losses[step],
                "breakeven/stability": 2.0 if step * 10 >= violated_at else 0.5,
            }
        )
    return {
        "seed": seed,
        "setting": {"learning_rate": lr, "batch_size": batch},
        "records": records,
        "breakeven_step": tfb.stability.find_break_even(records),
        "total_steps": 200,
    }


def _planted_breakeven():
    points = []
    rng = np.random.default_rng(1)
    for lr in (0.01, 0.1):
        for batch in (32, 128):
            for seed in SEEDS:
                points.append(
                    _be_point(
                        lr,
                        batch,
                        seed,
                        # lambda_H: lower at larger lr and at smaller S.
                        lambda_h=(10 if lr == 0.1 else 50)
                        * (1 if batch == 32 else 2)
                        + rng.normal(0, 0.5),
                        # lambda_K: no effect at all.
                        lambda_k=5 + rng.normal(0, 1),
                        # conditioning: higher at larger lr at equal loss.
                        offset=(1.0 if lr == 0.1 else 0.0) + 0.01 * seed,
                        violated_at=20,
                    )
                )
    return points


def test_breakeven_claims_find_the_planted_effects_and_not_the_null():
    found = {c.claim: c for c in papers.breakeven_claims(_planted_breakeven())}
    assert len(found) == 7
    verdict = {
        key: next(c.verdict for text, c in found.items() if key in text)
        for key in (
            "larger learning rate gives a lower maximum of lambda_H",
            "smaller batch size gives a lower maximum of lambda_H",
            "larger learning rate gives a lower maximum of lambda_K",
            "smaller batch size gives a lower maximum of lambda_K",
            "larger learning rate gives a higher Tr(K)",
            "smaller batch size gives a higher Tr(K)",
            "break-even point",
        )
    }
    assert verdict[
        "larger learning rate gives a lower maximum of lambda_H"
    ] == (claims.REPRODUCED)
    assert verdict["smaller batch size gives a lower maximum of lambda_H"] == (
        claims.REPRODUCED
    )
    for null in ("learning rate", "batch size"):
        key = next(k for k in verdict if "lambda_K" in k and null in k)
        assert verdict[key] == claims.INCONCLUSIVE
    assert verdict["larger learning rate gives a higher Tr(K)"] == (
        claims.REPRODUCED
    )
    assert verdict["smaller batch size gives a higher Tr(K)"] == (
        claims.INCONCLUSIVE
    )
    assert verdict["break-even point"] == claims.REPRODUCED
    lr_claim = next(c for t, c in found.items() if "lambda_H" in t)
    assert lr_claim.seeds == list(SEEDS)
    assert [c["at"] for c in lr_claim.effect["comparisons"]] == [
        {"batch_size": 128},
        {"batch_size": 32},
    ]


def test_break_even_claim_is_contradicted_by_a_late_or_missing_point():
    def run(step):
        return {
            "seed": 0,
            "setting": {"learning_rate": 0.1},
            "breakeven_step": step,
            "total_steps": 100,
        }

    assert claims.break_even_claim([run(10), run(20)]).verdict == (
        claims.REPRODUCED
    )
    assert claims.break_even_claim([run(10), run(40)]).verdict == (
        claims.INCONCLUSIVE
    )
    assert claims.break_even_claim([run(10), run(80)]).verdict == (
        claims.NOT_REPRODUCED
    )
    missing = claims.break_even_claim([run(10), run(None)])
    assert missing.verdict == claims.NOT_REPRODUCED
    assert missing.effect["reached"] == 1


def _confusion_points(width_effect, depth_effect, bn_effect):
    points = []
    rng = np.random.default_rng(2)
    settings = papers.confusion_settings((8, 32, 128), (2, 8), 4)
    for setting in settings:
        for seed in SEEDS:
            value = -0.5 + rng.normal(0, 0.02)
            value += width_effect * math.log2(setting["width"] / 8) / 4
            value -= depth_effect * (setting["depth"] - 2) / 6
            if setting["arch"] == papers.BN_SKIP:
                value += bn_effect
            points.append({"seed": seed, "setting": setting, "value": value})
    return points


def test_confusion_settings_and_claims_with_planted_effects():
    settings = papers.confusion_settings((8, 32, 128), (2, 8), 4)
    assert settings == [
        {"width": 8, "depth": 2, "arch": "plain", "microbatch_size": 1},
        {"width": 32, "depth": 2, "arch": "plain", "microbatch_size": 1},
        {"width": 128, "depth": 2, "arch": "plain", "microbatch_size": 1},
        {"width": 32, "depth": 8, "arch": "plain", "microbatch_size": 1},
        {"width": 32, "depth": 8, "arch": "plain", "microbatch_size": 4},
        {"width": 32, "depth": 8, "arch": "bn+skip", "microbatch_size": 4},
    ]
    planted = papers.confusion_claims(
        _confusion_points(0.3, 0.2, 0.3), "at initialization"
    )
    assert [c.verdict for c in planted] == [claims.REPRODUCED] * 3
    assert all(c.claim.endswith("at initialization.") for c in planted)
    null = papers.confusion_claims(_confusion_points(0, 0, 0), "x")
    assert [c.verdict for c in null] == [claims.INCONCLUSIVE] * 3
    reversed_ = papers.confusion_claims(_confusion_points(-0.3, 0, 0), "x")
    assert reversed_[0].verdict == claims.NOT_REPRODUCED


class _Task:
    def __init__(self, kind, path, seed, setting):
        self.kind, self.path = kind, path
        self.seed, self.setting = seed, setting


def _write_run(path, point):
    os.makedirs(path)
    recorder = tfb.Recorder(os.path.join(path, "records.jsonl"))
    for record in point["records"]:
        metrics = {k: v for k, v in record.items() if k != "step"}
        recorder.write(
            step=record["step"], epoch=0, source="x", metrics=metrics
        )
    recorder.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {"model": "simple_cnn", **point["setting"], "model_kwargs": {}}, f
        )
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"total_steps": point["total_steps"]}, f)


def test_report_schema_figures_and_markdown(tmp_path):
    tasks = []
    for i, point in enumerate(_planted_breakeven()):
        path = str(tmp_path / "runs" / f"run{i}")
        _write_run(path, point)
        tasks.append(_Task("train", path, point["seed"], point["setting"]))
    grid = papers.BREAKEVEN["quick"]
    paths = verdicts.write(str(tmp_path), "breakeven", tasks, grid)
    entries = verdicts.read(paths["claims.json"])
    assert len(entries) == 7
    for entry in entries:
        assert set(entry) == CLAIM_KEYS
        assert entry["paper"] == "breakeven"
        assert entry["verdict"] in claims.VERDICTS
        assert entry["seeds"] == list(SEEDS)
        assert os.path.getsize(tmp_path / "report" / entry["figure"]) > 0
    first = entries[0]["effect"]["comparisons"][0]
    assert set(first["lower"]) == {str(s) for s in SEEDS}  # per seed
    assert entries[0]["verdict"] == claims.REPRODUCED
    text = open(paths["claims.md"]).read()
    assert claims.CRITERION in text
    assert all(f"]({e['figure']})" in text for e in entries)
    assert (tmp_path / "report" / "summary.csv").exists()  # sweep report


def test_probe_loss_is_the_mean_loss_and_changes_nothing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.integers(0, 4, 12).astype("int32")
    w = rng.uniform(0.5, 2, 12).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(4),
        ]
    )
    model.compile(optimizer="sgd", loss=cross_entropy())
    callback = tfb.ProbeLoss(
        tf.data.Dataset.from_tensor_slices((x, y, w)).batch(5), schedule=2
    )
    before = [v.numpy().copy() for v in model.variables]
    model.fit(x, y, epochs=1, batch_size=3, verbose=0, callbacks=[callback])
    steps = [r["step"] for r in callback.records]
    assert steps == [2, 4]
    kernel1, bias1, kernel2, bias2 = (
        v.numpy().astype(np.float64) for v in model.trainable_variables
    )
    logits = np.tanh(x @ kernel1 + bias1) @ kernel2 + bias2  # no dropout
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = np.mean(-w * log_p[np.arange(12), y])
    assert callback.latest["probe/loss"] == pytest.approx(expected, rel=1e-5)
    # A measurement is not a training step: measuring again (the model as
    # fit left it) reads and writes no variable.
    after = [v.numpy().copy() for v in model.variables]
    callback.measure()
    assert all(
        np.array_equal(a, v.numpy()) for a, v in zip(after, model.variables)
    )
    assert not all(np.array_equal(a, b) for a, b in zip(before, after))


def test_sphere_data_and_the_measurement_at_initialization():
    x, y = initialization.sphere_data(12, 5, 3, seed=4)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    assert set(np.unique(y)) <= {0, 1, 2}
    again, _ = initialization.sphere_data(12, 5, 3, seed=4)
    np.testing.assert_array_equal(x, again)
    grid = papers.ConfusionScale(
        init_data="sphere",
        init_dim=5,
        init_classes=3,
        init_examples=12,
        init_widths=(6,),
        init_depths=(2,),
        train=papers.CONFUSION["quick"].train,
        train_widths=(6,),
        train_depths=(2,),
        bn_microbatch=4,
        seeds=1,
    )
    setting = {"width": 6, "depth": 2, "arch": "plain", "microbatch_size": 1}
    measured = initialization.measure(grid, setting, seed=4)
    # Reference: the same seeded model, per-example gradients in a loop.
    keras.utils.set_random_seed(4)
    model = models.get_model(
        "mlp", num_classes=3, input_shape=(5,), width=6, depth=2,
        init="gaussian",
    )  # fmt: skip
    assert measured["num_parameters"] == model.count_params()
    rows = []
    for i in range(12):
        with tf.GradientTape() as tape:
            loss = cross_entropy()(y[i : i + 1], model(x[i : i + 1]))
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    rows = np.array(rows, dtype=np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cosines = (unit @ unit.T)[np.triu_indices(12, 1)]
    assert measured["metrics"]["confusion/cos_min"] == pytest.approx(
        cosines.min(), abs=1e-6
    )
