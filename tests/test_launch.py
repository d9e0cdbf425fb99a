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


# Whole epochs of 5 batches (1,437 digits // 256): with --steps_per_epoch
# below an epoch of data a resumed run starts its batches at the next data
# epoch, not where the Keras epoch left off (the xfail test below).
WHOLE_EPOCHS = ("--batch_size=256", "--epochs=3")


def _launch(workdir, *flags):
    """The launcher in a subprocess; its output goes to `process.log` (a
    pipe nobody reads while it runs could fill up and block it)."""
    log = f"{workdir}.{time.monotonic_ns()}.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tf_breakeven.launch.train",
                f"--workdir={workdir}",
                "--model_arg=filters=(4,8)",
                "--model_arg=dense_units=16",
                *WHOLE_EPOCHS,
                "--verbose=0",
                *flags,
            ],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    process.log = log
    return process


def _finish(process, timeout):
    """Waits for `process` (killed by its PID after `timeout`); its log."""
    try:
        process.wait(timeout=timeout)
    finally:
        _stop(process)
    with open(process.log) as f:
        return f.read()


def _by_source(workdir):
    """{(source, schedule): [record, ...]} in file order."""
    groups = {}
    for r in tfb.read_records(os.path.join(workdir, "records.jsonl")):
        key = (r["source"], json.dumps(r["config"].get("schedule")))
        groups.setdefault(key, []).append(r)
    return groups


def _stop(process):
    """SIGKILLs `process` by its PID if it still runs, and reaps it."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)


def _wait_for_step(workdir, process, step, timeout):
    """Waits until the BreakEven records reach `step` (bounded in time)."""
    deadline = time.monotonic() + timeout
    records = os.path.join(workdir, "records.jsonl")
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(records) and max(_steps(workdir) or [0]) >= step:
            return
        time.sleep(0.2)
    pytest.fail(f"the run never reached step {step} (rc={process.poll()})")


# Keras' BackupAndRestore checkpoint holds no SeedGenerator state, so a
# resumed run draws other dropout masks: dropout off, the trajectory is
# restored exactly.
NO_DROPOUT = ("--model_arg=conv_dropout=0.0", "--model_arg=dense_dropout=0.0")
# BreakEven's Lanczos is warm-started from the last top eigenvector, which
# no checkpoint holds: after the resume these keys agree to the solver's
# roundoff, not bitwise.
WARM_STARTED = {
    "hessian/lambda_1",
    "breakeven/sharpness_x_lr",
    "breakeven/curvature_variance",
    "breakeven/stability",
}
# How the solve went (its residual, steps and convergence) depends on the
# start vector too; those are compared above only through the values.
SOLVE_REPORT = {
    "hessian/residual_1",
    "hessian/converged",
    "hessian/lanczos_steps",
}
# The tracked train step's latest values are no checkpoint state either:
# the epoch logs show NaN after a resume until its next tracked step.
TRACKED_STEP = {"grad/step_norm", "grad/update_norm"}


def _same(mine, theirs, skip=()):
    skip = {"wall_time", *skip}
    mine = {k: v for k, v in mine.items() if k not in skip}
    theirs = {k: v for k, v in theirs.items() if k not in skip}
    return json.dumps(mine) == json.dumps(theirs)  # bitwise, NaN included


def test_kill_9_and_resume_without_lost_or_duplicated_records(tmp_path):
    """Every callback's records after kill -9 and resume: each source's
    steps once, none missing, and the values of an uninterrupted run."""
    workdir, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    flags = ("--measure_every=1", *NO_DROPOUT)
    uninterrupted = _launch(reference, *flags)
    process = _launch(workdir, *flags)
    try:
        # Kill in the middle of epoch 2 (steps 6-10), after its backup.
        _wait_for_step(str(workdir), process, 7, timeout=400)
    finally:
        _stop(process)
    killed_at = time.time()
    before = _steps(str(workdir))
    assert 7 <= max(before) < 15
    resumed = _launch(workdir, *flags)
    try:
        for run in (resumed, uninterrupted):
            log = _finish(run, timeout=900)
            assert run.returncode == 0, log[-3000:]
    finally:
        _stop(resumed)
        _stop(uninterrupted)
    expected, got = _by_source(str(reference)), _by_source(str(workdir))
    assert {source for source, _ in expected} >= {
        "BreakEven",
        "GradientCovariance",
        "GradientConfusion",
    }
    assert got.keys() == expected.keys()
    # The step the resumed run restored: an epoch end (its backup).
    restored = -1 + min(
        r["step"]
        for rs in got.values()
        for r in rs
        if r["wall_time"] > killed_at
    )
    assert restored in (5, 10) and restored < max(before)
    for key, records in expected.items():
        assert [r["step"] for r in records] == list(range(1, 16)), key
        assert [r["step"] for r in got[key]] == list(range(1, 16)), key
        for mine, theirs in zip(got[key], records):
            assert (mine["wall_time"] > killed_at) == (mine["step"] > restored)
            warm = key[0] == "BreakEven" and mine["step"] > restored
            assert _same(
                mine, theirs, WARM_STARTED | SOLVE_REPORT if warm else ()
            ), (
                key,
                mine["step"],
            )
            for name in WARM_STARTED & mine.keys() if warm else ():
                # Converged from another start, to the solver tolerance.
                assert mine[name] == pytest.approx(theirs[name], rel=1e-4)
    rows = [
        (run / "history.csv").read_text().splitlines()
        for run in (workdir, reference)
    ]
    columns = rows[0][0].split(",")
    assert columns == rows[1][0].split(",")
    assert [row.split(",")[0] for row in rows[0][1:]] == ["0", "1", "2"]
    resumed_epoch = restored // 5
    for mine, theirs in zip(rows[0][1:], rows[1][1:]):  # no epoch twice
        epoch = int(mine.split(",")[0])
        for column, a, b in zip(columns, mine.split(","), theirs.split(",")):
            if column.split("/")[0] in ("hessian", "breakeven"):
                continue  # the warm-started Lanczos
            stale = column in TRACKED_STEP and epoch == resumed_epoch
            assert a == b or (stale and a == "nan"), (epoch, column)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["breakeven_step"] == tfb.stability.find_break_even(
        [r for rs in got.values() for r in rs if r["source"] == "BreakEven"],
        criterion="sgd",
    )


def test_a_resumed_fit_gets_the_batches_of_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    config = _tiny(epochs=4, steps_per_epoch=4, tracking="none")
    run = experiment.build(config, str(tmp_path / "run"))
    os.makedirs(run.backup_dir)
    with open(os.path.join(run.backup_dir, "training_metadata.json"), "w") as f:
        json.dump({"epoch": 2, "batch": 0}, f)  # BackupAndRestore's
    given = []

    def fit(train, **kwargs):
        given.append(train)
        return keras.callbacks.History()

    monkeypatch.setattr(run.model, "fit", fit)
    experiment.fit(run, config, [])
    stream = list(run.spec.train_epochs(0, 4).take(16))
    resumed = list(given[0].take(8))
    for (x, _), (x_resumed, _) in zip(stream[8:], resumed):
        np.testing.assert_array_equal(x, x_resumed)


class _KilledAt(keras.callbacks.Callback):
    """Stops a run at the start of `epoch`, after the last one's backup."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("killed")


@pytest.mark.parametrize("steps_per_epoch", [4, 22])  # 22 = one data pass
def test_a_resume_with_dropout_ends_where_the_uninterrupted_run_does(
    tmp_path, monkeypatch, steps_per_epoch
):
    # The tiny SimpleCNN has dropout; the seed states are backed up with
    # the weights, and the batches continue at the resumed step.
    config = _tiny(epochs=3, steps_per_epoch=steps_per_epoch, tracking="none")
    reference = experiment.train_and_evaluate(config, str(tmp_path / "ref"))
    plain = experiment.keras_callbacks
    monkeypatch.setattr(
        experiment, "keras_callbacks", lambda run: plain(run) + [_KilledAt(2)]
    )
    workdir = str(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="killed"):
        experiment.train_and_evaluate(config, workdir)
    monkeypatch.setattr(experiment, "keras_callbacks", plain)
    resumed = experiment.train_and_evaluate(config, workdir)
    assert resumed["final"] == reference["final"]
    ref = keras.models.load_model(tmp_path / "ref" / "model.keras")
    again = keras.models.load_model(tmp_path / "resumed" / "model.keras")
    for a, b in zip(ref.weights, again.weights):  # files keep no seed state
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_without_the_seed_backup_a_dropout_resume_differs(
    tmp_path, monkeypatch
):
    # The control: what the seed-state backup is for.
    config = _tiny(epochs=3, steps_per_epoch=4, tracking="none")
    reference = experiment.train_and_evaluate(config, str(tmp_path / "ref"))
    plain = experiment.keras_callbacks

    def without_seeds(run, extra=()):
        kept = [
            c
            for c in plain(run)
            if not isinstance(c, experiment.SeedStateBackup)
        ]
        return kept + list(extra)

    monkeypatch.setattr(
        experiment,
        "keras_callbacks",
        lambda run: without_seeds(run, [_KilledAt(2)]),
    )
    workdir = str(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="killed"):
        experiment.train_and_evaluate(config, workdir)
    monkeypatch.setattr(experiment, "keras_callbacks", without_seeds)
    resumed = experiment.train_and_evaluate(config, workdir)
    assert resumed["final"]["loss"] != reference["final"]["loss"]


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


def _run_script(
    tmp_path, workdir, replicas, strategy, env=None, stderr=subprocess.PIPE
):
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
        stdout=subprocess.DEVNULL,
        stderr=stderr,
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


# What a TensorFlow worker prints when its gRPC server cannot bind its port.
BIND_ERRORS = ("Could not start gRPC server", "Failed to add port")


def _start_workers(tmp_path, workdir, attempt, ports):
    """Two multi-worker processes on 127.0.0.1 `ports`; stderr to files
    (read after they end: a full pipe would block them)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        log = tmp_path / f"worker{index}.attempt{attempt}.stderr"
        with open(log, "w") as stderr:
            workers.append(
                (
                    _run_script(
                        tmp_path, workdir, 1, "multi_worker", env, stderr
                    ),
                    log,
                )
            )
    return workers


def _wait_for_workers(workers, timeout):
    """Waits for both; returns the stderr of each. A worker that fails stops
    the other (it would wait for its peer until the timeout)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process, _ in workers]
            if all(code is not None for code in codes) or any(
                code not in (None, 0) for code in codes
            ):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the multi-worker run did not finish in time")
    finally:
        for process, _ in workers:
            _stop(process)
    return [log.read_text() for _, log in workers]


def _multi_worker_run(tmp_path, workdir, first_ports=None, attempts=3):
    """The two-worker run, relaunched on fresh ports when a port picked
    free was taken before its worker bound it (bounded attempts); returns
    the attempt that ran."""
    for attempt in range(attempts):
        shutil.rmtree(workdir, ignore_errors=True)
        ports = first_ports if attempt == 0 and first_ports else None
        ports = ports or _free_ports(2)
        workers = _start_workers(tmp_path, workdir, attempt, ports)
        errors = _wait_for_workers(workers, timeout=600)
        codes = [process.returncode for process, _ in workers]
        if all(code == 0 for code in codes):
            return attempt
        tails = "\n---\n".join(err[-2000:] for err in errors)
        if not any(m in err for err in errors for m in BIND_ERRORS):
            pytest.fail(f"workers failed ({codes}):\n{tails}")
    pytest.fail(f"ports taken in {attempts} attempts:\n{tails}")


def test_bind_errors_are_what_a_worker_prints_on_a_taken_port(tmp_path):
    """The retry of the multi-worker test recognizes a taken port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{port}", "127.0.0.1:9"]},
                "task": {"type": "worker", "index": 0},
            }
        )
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import tensorflow as tf\n"
                "tf.distribute.MultiWorkerMirroredStrategy()",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode != 0
    assert any(message in result.stderr for message in BIND_ERRORS)


def test_multi_worker_trains_and_records_once_like_one_process(tmp_path):
    log = tmp_path / "single.stderr"
    with open(log, "w") as stderr:  # read after: a full pipe would block it
        single = _run_script(
            tmp_path, tmp_path / "single", 1, "default", stderr=stderr
        )
    try:
        # The first attempt gets a port another process holds, as in the
        # race between picking a free port and binding it: the run retries.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            first = [taken.getsockname()[1], _free_ports(1)[0]]
            attempt = _multi_worker_run(tmp_path, tmp_path / "multi", first)
        assert attempt == 1
        single.wait(timeout=600)
        assert single.returncode == 0, log.read_text()[-3000:]
    finally:
        _stop(single)
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
        ("tf-breakeven-reproduce", "--paper"),
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


def test_report_trajectories_compare_an_adam_run_with_its_own_threshold(
    tmp_path,
):
    """An Adam run's dashed threshold (38/eta) belongs with its
    preconditioned sharpness, which the trajectories figure draws beside
    lambda_1; its table row has the maximum preconditioned sharpness."""
    recorder = tfb.Recorder(tmp_path / "records.jsonl")
    for step, sharp in ((1, 10.0), (2, 30.0), (4, 50.0)):
        recorder.write(
            step=step,
            epoch=0,
            source="BreakEven",
            metrics={
                "hessian/lambda_1": sharp / 10,
                "breakeven/preconditioned_sharpness": sharp,
                "breakeven/threshold": 38.0 / (0.1 * step),
            },
            config={"criterion": "adam"},
        )
    recorder.close()
    records = tfb.read_records(tmp_path / "records.jsonl")
    fig = report.plot_trajectories([{"name": "adam", "records": records}])
    lambda_1, compared, threshold = fig.axes[0].lines[:3]
    np.testing.assert_array_equal(lambda_1.get_ydata(), [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(compared.get_ydata(), [10.0, 30.0, 50.0])
    np.testing.assert_allclose(threshold.get_ydata(), [380.0, 190.0, 95.0])
    row = report.table(
        [
            {
                "name": "adam",
                "config": {"model": "m", "learning_rate": 0.1, "batch_size": 8},
                "summary": {},
                "records": records,
            }
        ]
    )[0]
    assert row["max_preconditioned_sharpness"] == 50.0
