"""benchmarks/peers.py: skips cleanly without torch; with it, both sides
compute the same numbers (the peers run on our weights)."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(REPO, "benchmarks", "peers.py")


def test_peers_without_torch_says_how_to_install_it():
    # A meta-path finder that refuses torch: `import torch` fails as if it
    # were not installed, and nothing else changes.
    code = "\n".join(
        [
            "import runpy, sys",
            "class NoTorch:",
            "    def find_spec(self, name, path=None, target=None):",
            "        if name.split('.')[0] == 'torch':",
            "            raise ImportError(name)",
            "sys.meta_path.insert(0, NoTorch())",
            f"sys.argv = [{PEERS!r}]",
            f"sys.path.insert(0, {os.path.dirname(PEERS)!r})",
            f"runpy.run_path({PEERS!r}, run_name='__main__')",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "Skipped: torch" in result.stdout and "not installed" in result.stdout
    )
    assert 'pip install -e ".[bench]"' in result.stdout


def _value(output, label):
    match = re.search(rf"\| {re.escape(label)} \| ([^|]+) \|", output)
    assert match, f"no {label!r} row in:\n{output[-3000:]}"
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None
    or importlib.util.find_spec("pyhessian") is None,
    reason="the PyTorch peers are an optional extra: pip install -e '.[bench]'",
)
def test_peers_tiny_run_agrees_across_frameworks():
    result = subprocess.run(
        [sys.executable, PEERS, "--tiny", "--batch_size=8", "--repeats=1"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for section in out.split("### ")[1:]:
        assert _value(section, "max |logits ours - torch|") < 1e-5
        assert (
            _value(section, "max |Gram torch.func/gram - ours| / max |ours|")
            < 1e-5
        )
        # PyHessian stops at a relative change of 1e-3 between iterations.
        assert _value(section, "relative error pyhessian/top") < 2e-2
        assert _value(section, "relative error ours/top_fixed") < 1e-4


def test_ritz_by_step_matches_numpy_on_each_leading_tridiagonal():
    # benchmarks/stopping_rule.py and lanczos_start.py replay stopping
    # rules on these values; the last step's residual is unknown (inf),
    # so no rule can stop there by accident.
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(3)
    alphas = rng.normal(size=6)
    betas = np.abs(rng.normal(size=5)) + 0.1
    values, residuals = common.ritz_by_step(alphas, betas)
    for m in range(1, 7):
        t = np.diag(alphas[:m])
        t += np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
        w, s = np.linalg.eigh(t)
        np.testing.assert_allclose(values[m - 1], w[-1], rtol=1e-12)
        if m < 6:
            expected = abs(betas[m - 1] * s[-1, -1]) / abs(w[-1])
            np.testing.assert_allclose(residuals[m - 1], expected, rtol=1e-9)
    assert residuals[-1] == np.inf
