"""End-to-end launcher runs: offline default, datasets, resume, distributed,
XLA, sweep and report."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tf_breakeven as tfb
from tf_breakeven.launch import config as config_lib
from tf_breakeven.launch import experiment, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CNN = {"filters": (4, 8), "dense_units": 16}


def _tiny(**changes):
    base = config_lib.Config(
        model="simple_cnn",
        model_kwargs=dict(TINY_CNN),
        dataset="digits",
        batch_size=64,
        epochs=2,
        steps_per_epoch=4,
        learning_rate=0.05,
        tracking="paper",
        probe_fraction=0.05,
        verbose=0,
    )
    return base.replace(**changes)


def _steps(workdir, source="BreakEven"):
    return [
        r["step"]
        for r in tfb.read_records(
            os.path.join(workdir, "records.jsonl"), source
        )
    ]


def test_offline_default_run_writes_everything(tmp_path):
    workdir = str(tmp_path / "run")
    summary = experiment.train_and_evaluate(_tiny(), workdir)
    for name in (
        "config.json",
        "records.jsonl",
        "model.keras",
        "summary.json",
        "history.csv",
    ):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.path.basename(p) for p in summary["figures"]) == [
        "conditioning.png",
        "cosines.png",
        "sharpness.png",
    ]
    records = tfb.read_records(os.path.join(workdir, "records.jsonl"))
    sources = {r["source"] for r in records}
    assert {"BreakEven", "GradientCovariance", "GradientConfusion"} <= sources
    assert _steps(workdir) == [4, 8]  # end of each 4-step epoch
    for record in records:
        if record["source"] == "BreakEven":
            assert np.isfinite(record["hessian/lambda_1"])
            assert record["breakeven/threshold"] == pytest.approx(2 / 0.05)
    assert summary["max"]["hessian/lambda_1"] == pytest.approx(
        max(r["hessian/lambda_1"] for r in records if "hessian/lambda_1" in r)
    )
    # A finished run is done; the model reloads.
    assert experiment.is_done(workdir)
    keras.models.load_model(os.path.join(workdir, "model.keras"))


def test_readme_main_job_command_runs(tmp_path):
    """`python -m tf_breakeven.launch.train` with the README's default,
    shortened."""
    workdir = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_breakeven.launch.train",
            f"--workdir={workdir}",
            "--epochs=1",
            "--steps_per_epoch=3",
            "--verbose=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "records:" in result.stdout and "figures:" in result.stdout
    assert (workdir / "records.jsonl").exists()


def _mock_config(name):
    configs = {
        "mnist": _tiny(dataset="mnist"),
        "fashion_mnist": _tiny(dataset="fashion_mnist"),
        "cifar10": _tiny(dataset="cifar10", augment=True),
        "cifar100": _tiny(dataset="cifar100"),
        "imagenet2012": _tiny(
            dataset="imagenet2012",
            model="resnet32",
            model_kwargs={"depth": 8, "base_filters": 2},
            image_size=32,
        ),
        "imdb_reviews": _tiny(
            dataset="imdb_reviews",
            model="lstm",
            model_kwargs={"embedding_dim": 4, "units": 4},
            sequence_length=8,
            vocabulary_size=50,
        ),
        "glue/mnli": _tiny(
            dataset="glue/mnli",
            model="bert",
            model_kwargs={
                "num_layers": 1,
                "num_heads": 2,
                "hidden_dim": 4,
                "intermediate_dim": 8,
                "dropout": 0.0,
            },
        ),
    }
    return configs[name]


@pytest.mark.parametrize(
    "name",
    [
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagenet2012",
        "imdb_reviews",
        "glue/mnli",
    ],
)
def test_each_dataset_trains_with_tracking_under_mock_data(name, tmp_path):
    config = _mock_config(name).replace(
        epochs=1,
        steps_per_epoch=2,
        probe_fraction=0.5,
        microbatch_size=4,
    )
    with tfds.testing.mock_data(num_examples=64):
        summary = experiment.train_and_evaluate(config, str(tmp_path / "r"))
    assert np.isfinite(summary["max"]["hessian/lambda_1"])
    assert np.isfinite(summary["max"]["grad_cov/lambda_1"])


def _launch(workdir, *flags):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tf_breakeven.launch.train",
            f"--workdir={workdir}",
            "--model_arg=filters=(4,8)",
            "--model_arg=dense_units=16",
            "--batch_size=64",
            "--steps_per_epoch=4",
            "--epochs=4",
            "--verbose=0",
            *flags,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_and_resume_without_lost_or_duplicated_records(tmp_path):
    workdir = tmp_path / "killed"
    process = _launch(workdir, "--measure_every=1")
    records = workdir / "records.jsonl"
    deadline = time.time() + 300
    try:
        # Kill in the middle of epoch 2 (steps 9-12), after its backup.
        while time.time() < deadline:
            if records.exists() and max(_steps(str(workdir)) or [0]) >= 10:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached step 10")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    before = _steps(str(workdir))
    assert 10 <= max(before) < 16
    resumed = _launch(workdir, "--measure_every=1")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert _steps(str(workdir)) == list(range(1, 17))
    summary = json.loads((workdir / "summary.json").read_text())
    records = tfb.read_records(str(records))
    assert summary["breakeven_step"] == tfb.stability.find_break_even(
        [r for r in records if r["source"] == "BreakEven"],
        criterion="sgd",
    )


_DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import tensorflow as tf
    replicas = int(sys.argv[2])
    if replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
    from test_launch import _tiny
    from tf_breakeven.launch import experiment
    # No dropout: replicas draw different masks than one device would.
    config = _tiny(strategy=sys.argv[4], epochs=2, steps_per_epoch=3,
                   model_kwargs={"filters": (4, 8), "dense_units": 16,
                                 "conv_dropout": 0.0, "dense_dropout": 0.0})
    experiment.train_and_evaluate(config, sys.argv[1])
    """
)


def _run_script(tmp_path, workdir, replicas, strategy, env=None):
    script = tmp_path / "distributed.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(workdir),
            str(replicas),
            REPO,
            strategy,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _numbers(workdir):
    out = {}
    for r in tfb.read_records(os.path.join(workdir, "records.jsonl")):
        for key, value in r.items():
            if isinstance(value, float) and key != "wall_time":
                out[(r["source"], r["step"], key)] = value
    return out


def _assert_same_numbers(a, b, rel=1e-3):
    assert a.keys() == b.keys() and a
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-5), key


def test_mirrored_run_records_the_single_device_numbers(tmp_path):
    one = _run_script(tmp_path, tmp_path / "one", 1, "default")
    two = _run_script(tmp_path, tmp_path / "two", 2, "mirrored")
    for process in (one, two):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    _assert_same_numbers(_numbers(tmp_path / "one"), _numbers(tmp_path / "two"))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_trains_and_records_once_like_one_process(tmp_path):
    single = _run_script(tmp_path, tmp_path / "single", 1, "default")
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    try:
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            workers.append(
                _run_script(
                    tmp_path, tmp_path / "multi", 1, "multi_worker", env
                )
            )
        for process in [single, *workers]:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-3000:]
    finally:
        for process in [single, *workers]:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
    # One record file, written by the chief; the worker wrote none.
    assert not (
        tmp_path / "multi" / "worker_scratch_1" / "records.jsonl"
    ).exists()
    _assert_same_numbers(
        _numbers(tmp_path / "single"), _numbers(tmp_path / "multi")
    )


def test_tracked_train_step_compiles_with_xla(tmp_path):
    """TPU readiness: the train step with all step tracking, and the
    measurement callbacks, compiled by XLA."""
    summary = experiment.train_and_evaluate(
        _tiny(
            jit_compile=True,
            epochs=1,
            steps_per_epoch=2,
            step_tracking_every=1,
            step_tracking_gram=True,
            step_tracking_hessian_every=1,
        ),
        str(tmp_path / "xla"),
    )
    assert np.isfinite(summary["max"]["hessian/lambda_1"])
    for key in (
        "grad/step_norm",
        "batch/grad_cov/lambda_1",
        "hessian/lambda_1_running",
    ):
        assert np.isfinite(summary["final"][key]), key


def test_mixed_bfloat16_run_trains_and_measures(tmp_path):
    summary = experiment.train_and_evaluate(
        _tiny(precision="mixed_bfloat16", epochs=1, steps_per_epoch=2),
        str(tmp_path / "bf16"),
    )
    assert np.isfinite(summary["max"]["hessian/lambda_1"])
    model = keras.models.load_model(tmp_path / "bf16" / "model.keras")
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # restored


def test_sweep_of_two_by_two_and_its_report(tmp_path):
    workdir = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_breakeven.launch.sweep",
            f"--workdir={workdir}",
            "--grid=breakeven",
            "--learning_rates=0.01,0.1",
            "--batch_sizes=32,64",
            "--model_arg=filters=(4,8)",
            "--model_arg=dense_units=16",
            "--epochs=1",
            "--steps_per_epoch=2",
            "--verbose=0",
            "--num_shards=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(os.listdir(workdir))
    assert runs == ["lr0.01_bs32", "lr0.01_bs64", "lr0.1_bs32", "lr0.1_bs64"]
    paths = report.write_report(str(workdir))
    for name in (
        "trajectories.png",
        "max_vs_lr_bs.png",
        "confusion.png",
        "cosines.png",
        "summary.md",
        "summary.csv",
    ):
        assert os.path.getsize(paths[name]) > 0
    rows = report.table(report.load_runs(str(workdir)))
    for row in rows:
        records = tfb.read_records(workdir / row["run"] / "records.jsonl")
        assert row["max_lambda_H"] == max(
            r["hessian/lambda_1"] for r in records if "hessian/lambda_1" in r
        )
    # A second sweep skips the finished runs.
    mtime = os.path.getmtime(workdir / "lr0.1_bs64" / "summary.json")
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_breakeven.launch.sweep",
            f"--workdir={workdir}",
            "--grid=breakeven",
            "--learning_rates=0.01,0.1",
            "--batch_sizes=32,64",
            "--shard_index=1",
            "--num_shards=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.path.getmtime(workdir / "lr0.1_bs64" / "summary.json") == mtime


def test_pyproject_lists_every_package_folder():
    """The wheel's packages are listed explicitly (models/ and launch/ are
    mapped into tf_breakeven), so a new subpackage must be added there."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    folders = {"tf_breakeven": "tf_breakeven", **setuptools["package-dir"]}
    found = set()
    for package, folder in folders.items():
        top = os.path.join(REPO, folder)
        for path, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                relative = os.path.relpath(path, top)
                found.add(
                    package
                    if relative == "."
                    else ".".join([package, *relative.split(os.sep)])
                )
    assert sorted(setuptools["packages"]) == sorted(found)


def test_zoo_and_launchers_import_from_any_directory(tmp_path):
    """Installed inside the library's namespace, not as top-level `models`
    and `launch`: a project's own models/ cannot shadow them."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("SHADOW = True\n")
    script = (
        "import tf_breakeven.models as m, tf_breakeven.launch.sweep\n"
        "assert not hasattr(m, 'SHADOW') and 'simple_cnn' in m.available()\n"
        "import models\n"
        "assert models.SHADOW\n"
    )
    for cwd in (tmp_path, REPO):
        if cwd == REPO:
            script = script.split("import models")[0]
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]


def test_flags_are_generated_from_the_config_fields():
    from absl import flags

    values = flags.FlagValues()
    names = config_lib.define_flags(values)
    assert "model_arg" in names and "model_kwargs" not in names
    assert len(names) == len(dataclasses.fields(config_lib.Config))
    values(["prog"])
    assert config_lib.from_flags(values) == config_lib.Config()
    values(
        [
            "prog",
            "--model_arg=filters=(4,8)",
            "--model_arg=init=orthogonal",
            "--optimizer=momentum",
            "--steps_per_epoch=7",
            "--noaugment",
            "--jit_compile",
            "--learning_rate=0.1",
            "--measure_every=3",
            "--tpu=local",
        ]
    )
    assert config_lib.from_flags(values) == config_lib.Config(
        model_kwargs={"filters": (4, 8), "init": "orthogonal"},
        optimizer="momentum",
        steps_per_epoch=7,
        jit_compile=True,
        learning_rate=0.1,
        measure_every="3",
        tpu="local",
    )
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--tracking=luxury"])


@pytest.mark.parametrize(
    "script,flag",
    [
        ("tf-breakeven-train", "--learning_rate"),
        ("tf-breakeven-sweep", "--learning_rates"),
        ("tf-breakeven-report", "--workdir"),
    ],
)
def test_console_scripts_print_the_launchers_help(script, flag):
    path = os.path.join(os.path.dirname(sys.executable), script)
    path = path if os.path.exists(path) else shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not installed (pip install -e .)")
    result = subprocess.run(
        [path, "--help"], capture_output=True, text=True, timeout=300
    )
    assert flag in result.stdout, result.stderr[-3000:]
    module = "tf_breakeven.launch." + script.rsplit("-", 1)[1]
    assert f"python -m {module}" in result.stdout  # the module's docstring
