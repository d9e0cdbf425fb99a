"""`python -m tf_breakeven.launch.reproduce` end to end, on tiny grids.

The papers' datasets come from `tfds.testing.mock_data` (random images of
the right shapes), the models are the zoo's tiny configurations; the runs
are too short for the verdicts to mean anything, so these tests check the
pipeline (grid, shards, resume, report schema, figures); the verdicts on
planted effects are tested in test_claims.py.
"""

import json
import os
import subprocess
import sys

from conftest import CLAIM_KEYS

from tf_breakeven.launch import claims

# The launcher in a child process (absl flags are process-global) with the
# tfds datasets mocked.
MOCKED = """
import sys
import tensorflow_datasets as tfds
from tf_breakeven.launch import reproduce
with tfds.testing.mock_data(num_examples=64):
    reproduce.run()
"""
TINY = (
    "--scale=paper",
    "--tiny",
    "--seeds=2",
    "--epochs=1",
    "--steps_per_epoch=3",
    "--probe_fraction=0.5",
)


def _reproduce(workdir, *flags, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-c", MOCKED, f"--workdir={workdir}", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _check_schema(path, paper, count):
    with open(path / "report" / "claims.json") as f:
        entries = json.load(f)
    assert len(entries) == count
    for entry in entries:
        assert set(entry) == CLAIM_KEYS
        assert entry["paper"] == paper
        assert entry["verdict"] in claims.VERDICTS
        assert os.path.getsize(path / "report" / entry["figure"]) > 0
    text = (path / "report" / "claims.md").read_text()
    assert claims.CRITERION in text
    return entries


def test_breakeven_paper_scale_in_two_shards_under_mock_data(tmp_path):
    flags = (
        "--paper=breakeven",
        *TINY,
        "--learning_rates=0.01,0.1",
        "--batch_sizes=8",
    )
    first = _reproduce(tmp_path, *flags, "--num_shards=2", "--shard_index=0")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 of 4 parts are not finished" in first.stdout
    assert not (tmp_path / "report").exists()
    second = _reproduce(tmp_path, *flags, "--num_shards=2", "--shard_index=1")
    assert second.returncode == 0, second.stderr[-3000:]
    entries = _check_schema(tmp_path, "breakeven", 7)
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert runs == [
        f"lr{lr}_bs8_seed{s}" for lr in ("0.01", "0.1") for s in (0, 1)
    ]
    config = json.loads(
        (tmp_path / "runs" / runs[0] / "config.json").read_text()
    )
    assert config["dataset"] == "cifar10" and config["model"] == "simple_cnn"
    assert config["model_kwargs"]["filters"] == [2, 4]  # --tiny
    # Every run recorded the probe loss at its measured steps.
    records = [
        json.loads(line)
        for line in open(tmp_path / "runs" / runs[0] / "records.jsonl")
    ]
    assert any("probe/loss" in r.get("metrics", r) for r in records)
    lr_claim = entries[0]["effect"]["comparisons"][0]
    assert lr_claim["at"] == {"batch_size": 8}
    assert set(lr_claim["lower"]) == {"0", "1"}  # per seed
    # A third call finds everything finished and only rewrites the report.
    third = _reproduce(tmp_path, *flags)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Running" not in third.stderr


def test_confusion_paper_scale_under_mock_data(tmp_path):
    result = _reproduce(
        tmp_path,
        "--paper=confusion",
        *TINY,
        "--init_widths=4,8",
        "--init_depths=2,3",
        "--init_examples=16",
        "--widths=1",
        "--depths=10",
        "--batch_size=16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    entries = _check_schema(tmp_path, "confusion", 6)
    assert [e["claim"].endswith("at initialization.") for e in entries] == [
        True
    ] * 3 + [False] * 3
    # At initialization: MLPs on mnist images projected on the unit sphere.
    init = sorted(os.listdir(tmp_path / "init"))
    assert len(init) == 5 * 2  # settings x seeds
    measured = json.loads((tmp_path / "init" / init[0]).read_text())
    assert -1.0 <= measured["metrics"]["confusion/cos_min"] <= 1.0
    width = next(e for e in entries if "wider" in e["claim"])
    assert width["effect"]["comparisons"][0]["lower_setting"] == 4
    # Training: the tiny WRN family with and without BN and skips.
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert runs == [
        "width1_depth10_bn_skip_m8_seed0",
        "width1_depth10_bn_skip_m8_seed1",
        "width1_depth10_plain_m1_seed0",
        "width1_depth10_plain_m1_seed1",
        "width1_depth10_plain_m8_seed0",
        "width1_depth10_plain_m8_seed1",
    ]


def test_bad_flags_are_usage_errors(tmp_path):
    for flag, message in (
        ("--seeds=0", "--seeds=0 must be >= 1"),
        ("--learning_rates=fast", "are not float values"),
    ):
        result = _reproduce(tmp_path, "--paper=breakeven", flag, timeout=120)
        assert result.returncode != 0
        assert message in result.stderr
    assert not os.listdir(tmp_path)
