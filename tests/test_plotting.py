"""Figures plot exactly the recorded numbers and are written as PNG."""

import matplotlib.image
import numpy as np

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
