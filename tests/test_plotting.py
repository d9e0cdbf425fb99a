"""Figures plot exactly the recorded numbers and are written as PNG."""

import matplotlib.image
import numpy as np
import pytest

from tf_breakeven import plotting, recording


def _records(tmp_path):
    path = tmp_path / "records.jsonl"
    recorder = recording.Recorder(path)
    rng = np.random.default_rng(0)
    for step in (1, 2, 4, 8, 16):
        recorder.write(
            step=step,
            epoch=0,
            source="BreakEven",
            metrics={
                "hessian/lambda_1": 3.0 * step,
                "breakeven/threshold": 40.0,
            },
        )
        recorder.write(
            step=step,
            epoch=0,
            source="GradientConfusion",
            metrics={
                "grad_cov/lambda_1": 1.0 / step,
                "grad_cov/trace_over_lambda_1": 2.0 + step,
                "grad_cov/condition": 0.1,
            },
            histograms={"confusion/cosines": rng.uniform(-0.5, 0.5, 300)},
        )
    recorder.write(
        step=16,
        epoch=0,
        source="BreakEven/event",
        metrics={"breakeven_step": 16},
    )
    records = recording.read_records(path)
    records[-1]["breakeven_step"] = 16
    return records


def test_sharpness_figure_plots_the_recorded_values(tmp_path):
    records = _records(tmp_path)
    fig = plotting.plot_sharpness(records)
    ax_h, ax_k = fig.axes
    np.testing.assert_array_equal(ax_h.lines[0].get_xdata(), [1, 2, 4, 8, 16])
    np.testing.assert_array_equal(ax_h.lines[0].get_ydata(), [3, 6, 12, 24, 48])
    np.testing.assert_array_equal(ax_h.lines[1].get_ydata(), [40] * 5)
    assert plotting.break_even_step(records) == 16
    np.testing.assert_allclose(
        ax_k.lines[0].get_ydata(), [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16]
    )


def test_cosine_density_integrates_to_one():
    values = np.random.default_rng(1).uniform(-0.4, 0.4, 1000)
    counts, edges = np.histogram(values, bins=np.linspace(-1, 1, 101))
    grid, density = plotting.cosine_density({"edges": edges, "counts": counts})
    assert abs(np.trapezoid(density, grid) - 1) < 1e-3
    mean = np.trapezoid(grid * density, grid)
    assert abs(mean - values.mean()) < 0.01


def test_save_figures_writes_pngs(tmp_path):
    paths = plotting.save_figures(_records(tmp_path), tmp_path / "figs")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
        "conditioning.png",
        "cosines.png",
        "sharpness.png",
    ]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.std() > 0


STEPS = (1, 2, 4, 8)


def _breakeven_records(tmp_path, criterion, extra=None, hessian_std=None):
    """BreakEven records of `criterion` through a real Recorder: lambda_1 =
    3 step, threshold 380, and each `extra` key as `value * step`; with
    `hessian_std`, HessianSpectrum records of lambda_1 = 5 step and
    `hessian/lambda_1_std` = `hessian_std * step`."""
    path = tmp_path / f"{criterion}.jsonl"
    recorder = recording.Recorder(path)
    for step in STEPS:
        metrics = {"hessian/lambda_1": 3.0 * step, "breakeven/threshold": 380.0}
        metrics.update({k: v * step for k, v in (extra or {}).items()})
        config = {"criterion": criterion} if criterion else {}
        recorder.write(
            step=step,
            epoch=0,
            source="BreakEven",
            metrics=metrics,
            config=config,
        )
        if hessian_std is not None:
            recorder.write(
                step=step,
                epoch=0,
                source="HessianSpectrum",
                metrics={
                    "hessian/lambda_1": 5.0 * step,
                    "hessian/lambda_1_std": hessian_std * step,
                },
            )
    return recording.read_records(path)


def _lines(ax):
    return {line.get_label(): line for line in ax.lines}


def test_records_without_a_criterion_plot_the_momentum_threshold(tmp_path):
    fig = plotting.plot_sharpness(_breakeven_records(tmp_path, None))
    ax_h = fig.axes[0]
    assert [line.get_label() for line in ax_h.lines] == [
        r"$\lambda_H^1$",
        r"$2(1+\beta)/\eta$",
    ]
    np.testing.assert_array_equal(ax_h.lines[0].get_ydata(), [3, 6, 12, 24])
    np.testing.assert_array_equal(ax_h.lines[1].get_ydata(), [380] * 4)
    assert not ax_h.collections  # no std recorded: no band


@pytest.mark.parametrize(
    "criterion, threshold_label",
    [
        ("adam", r"$(2+2\beta_1)/(\eta(1-\beta_1))$"),
        ("rmsprop", r"$2(1+\beta)/\eta$"),
    ],
)
def test_adaptive_criteria_plot_the_preconditioned_sharpness(
    tmp_path, criterion, threshold_label
):
    records = _breakeven_records(
        tmp_path,
        criterion,
        {"breakeven/preconditioned_sharpness": 7.0},
    )
    ax_h = plotting.plot_sharpness(records).axes[0]
    assert [line.get_label() for line in ax_h.lines] == [
        r"$\lambda_H^1$",
        r"$\lambda_1(P^{-1}H)$",
        threshold_label,
    ]
    lines = _lines(ax_h)
    np.testing.assert_array_equal(
        lines[r"$\lambda_1(P^{-1}H)$"].get_xdata(), STEPS
    )
    np.testing.assert_array_equal(
        lines[r"$\lambda_1(P^{-1}H)$"].get_ydata(), [7, 14, 28, 56]
    )
    np.testing.assert_array_equal(
        lines[r"$\lambda_H^1$"].get_ydata(), [3, 6, 12, 24]
    )
    np.testing.assert_array_equal(lines[threshold_label].get_ydata(), [380] * 4)


def test_sgd_criterion_plots_the_batch_sharpness(tmp_path):
    records = _breakeven_records(
        tmp_path, "sgd", {"breakeven/batch_sharpness": 0.5}
    )
    ax_h = plotting.plot_sharpness(records).axes[0]
    label = r"$\mathbb{E}_B[g_B^\top H_B g_B/\|g_B\|^2]$"
    assert [line.get_label() for line in ax_h.lines] == [
        r"$\lambda_H^1$",
        label,
        r"$2(1+\beta)/\eta$",
    ]
    np.testing.assert_array_equal(
        _lines(ax_h)[label].get_ydata(), [0.5, 1, 2, 4]
    )


def test_sgd_criterion_without_batch_sharpness_draws_no_empty_line(tmp_path):
    ax_h = plotting.plot_sharpness(_breakeven_records(tmp_path, "sgd")).axes[0]
    assert [line.get_label() for line in ax_h.lines] == [
        r"$\lambda_H^1$",
        r"$2(1+\beta)/\eta$",
    ]


def test_the_criterion_is_that_of_the_last_breakeven_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    recorder = recording.Recorder(path)
    for step, source, config in (
        (1, "BreakEven", {}),
        (2, "BreakEven", {"criterion": "full_batch"}),
        (4, "BreakEven", {"criterion": "adam"}),
        (8, "BreakEven", {}),
        (8, "GradientCovariance", {"criterion": "rmsprop"}),
    ):
        recorder.write(
            step=step,
            epoch=0,
            source=source,
            metrics={"hessian/lambda_1": 1.0},
            config=config,
        )
    records = recording.read_records(path)
    assert plotting.criterion_of(records) == "adam"
    assert plotting.criterion_of(records[:2]) == "full_batch"
    assert plotting.criterion_of(records[:1]) == "full_batch"


def test_std_band_spans_lambda_1_plus_minus_std(tmp_path):
    records = _breakeven_records(tmp_path, "full_batch", hessian_std=0.5)
    ax_h = plotting.plot_sharpness(records).axes[0]
    (band,) = ax_h.collections
    assert band.get_label() == r"$\lambda_H^1 \pm$ std"
    # HessianSpectrum's lambda_1 = 5 step with std 0.5 step (not
    # BreakEven's 3 step at the same steps).
    lower = {(s, 5.0 * s - 0.5 * s) for s in STEPS}
    upper = {(s, 5.0 * s + 0.5 * s) for s in STEPS}
    vertices = {tuple(v) for v in band.get_paths()[0].vertices}
    assert vertices == lower | upper


def _layer_records(tmp_path):
    """HessianSpectrum and GradientCovariance records with per-block keys
    (blocks "dense" and "head"; "head" has no Tr(K) part at step 4)."""
    path = tmp_path / "layers.jsonl"
    recorder = recording.Recorder(path)
    lambdas = {1: (10.0, 2.0), 2: (20.0, 3.0), 4: (40.0, 5.0)}
    traces = {1: (3.0, 1.0), 2: (1.0, 4.0), 4: (2.0, None)}
    for step in (4, 1, 2):  # written out of order: plotted by step
        dense, head = lambdas[step]
        recorder.write(
            step=step,
            epoch=0,
            source="HessianSpectrum",
            metrics={
                "hessian/lambda_1": dense + head,
                "hessian/lambda_1_std": 0.1,
                "hessian/lambda_1/dense": dense,
                "hessian/lambda_1/head": head,
            },
        )
        dense, head = traces[step]
        metrics = {"grad_cov/trace/dense": dense}
        if head is not None:
            metrics["grad_cov/trace/head"] = head
        metrics["grad_cov/trace"] = sum(metrics.values())
        recorder.write(
            step=step,
            epoch=0,
            source="GradientCovariance",
            metrics=metrics,
        )
    return recording.read_records(path)


def test_layers_figure_plots_block_eigenvalues_and_trace_shares(tmp_path):
    fig = plotting.plot_layers(_layer_records(tmp_path), title="run")
    ax_h, ax_k = fig.axes
    assert [line.get_label() for line in ax_h.lines] == ["dense", "head"]
    assert ax_h.get_yscale() == "log"
    dense, head = ax_h.lines
    np.testing.assert_array_equal(dense.get_xdata(), [1, 2, 4])
    np.testing.assert_array_equal(dense.get_ydata(), [10, 20, 40])
    np.testing.assert_array_equal(head.get_ydata(), [2, 3, 5])
    assert [line.get_label() for line in ax_k.lines] == ["dense", "head"]
    dense, head = ax_k.lines
    np.testing.assert_array_equal(dense.get_xdata(), [1, 2, 4])
    np.testing.assert_allclose(
        dense.get_ydata(), [3 / (3 + 1), 1 / (1 + 4), 2 / 2]
    )
    np.testing.assert_array_equal(head.get_xdata(), [1, 2])
    np.testing.assert_allclose(head.get_ydata(), [1 / (3 + 1), 4 / (1 + 4)])
    assert ax_k.get_ylim() == (0.0, 1.0)
    assert "no " not in ax_h.get_title() + ax_k.get_title()


def test_layers_figure_says_when_a_panel_has_no_data(tmp_path):
    records = [
        r for r in _layer_records(tmp_path) if r["source"] == "HessianSpectrum"
    ]
    ax_h, ax_k = plotting.plot_layers(records).axes
    assert len(ax_h.lines) == 2 and not ax_k.lines
    assert ax_k.get_title() == "no per-block Tr(K) recorded"
    ax_h, _ = plotting.plot_layers(_records(tmp_path)).axes
    assert ax_h.get_title() == "no per-block Hessian eigenvalues recorded"


def test_save_figures_writes_the_layers_png(tmp_path):
    records = _records(tmp_path) + _layer_records(tmp_path)
    paths = plotting.save_figures(records, tmp_path / "figs")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
        "conditioning.png",
        "cosines.png",
        "layers.png",
        "sharpness.png",
    ]
    (layers,) = [p for p in paths if p.endswith("layers.png")]
    with open(layers, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(layers)
    assert image.shape[0] > 100 and image.std() > 0
