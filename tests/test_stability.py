"""Stability conditions and break-even detection, by hand."""

import math

import pytest

from tf_breakeven import stability


def test_full_batch_ratio_and_momentum_threshold():
    assert stability.momentum_threshold(0.1) == pytest.approx(20.0)
    assert stability.momentum_threshold(0.1, 0.9) == pytest.approx(38.0)
    ratio = stability.stability_ratio(
        "full_batch", learning_rate=0.1, lambda_1=19.0, momentum=0.0
    )
    assert ratio == pytest.approx(0.95)
    assert not stability.is_unstable("full_batch", ratio)
    assert stability.is_unstable("full_batch", 1.0)


def test_sgd_condition_is_eq_1_of_the_paper():
    eta, lam, s2, batch, n = 0.1, 15.0, 400.0, 32, 1000
    expected = (1 - eta * lam) ** 2 + s2 * eta**2 * (n - batch) / (
        batch * (n - 1)
    )
    value = stability.stability_ratio(
        "sgd",
        learning_rate=eta,
        lambda_1=lam,
        curvature_variance=s2,
        batch_size=batch,
        dataset_size=n,
    )
    assert value == pytest.approx(expected, rel=1e-12)
    # Full batch (S = N): the noise term vanishes.
    assert stability.sgd_stability(eta, lam, s2, n, n) == pytest.approx(0.25)


def test_find_break_even_takes_the_first_violating_step():
    records = [
        {"step": 30, "breakeven/stability": 1.2},
        {"step": 10, "breakeven/stability": 0.5},
        {"step": 20, "breakeven/stability": 1.0},
        {"step": 25, "breakeven/stability": math.nan},
    ]
    assert stability.find_break_even(records) == 20
    assert stability.find_break_even(records, criterion="sgd") == 30
    assert stability.find_break_even(records[1:2]) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"criterion": "sgd", "learning_rate": 0.1, "lambda_1": 1.0},
        {"criterion": "newton", "learning_rate": 0.1, "lambda_1": 1.0},
        {"criterion": "full_batch", "learning_rate": 0.0, "lambda_1": 1.0},
        {
            "criterion": "full_batch",
            "learning_rate": 0.1,
            "lambda_1": 1.0,
            "momentum": 1.0,
        },
    ],
    ids=["sgd_missing_args", "bad_criterion", "zero_lr", "momentum_one"],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        stability.stability_ratio(**kwargs)
