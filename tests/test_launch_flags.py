"""The launcher's flags: every combination runs or is a one-line usage error.

`tf_breakeven.launch.validation` is checked directly over every zoo model x
dataset pair (no data, no training); two real command lines check that the
CLI prints the usage error without a traceback and exits with 1.
"""

import os
import re
import subprocess
import sys

import pytest
from absl import app

from tf_breakeven import models
from tf_breakeven.launch import config as config_lib
from tf_breakeven.launch import data as data_lib
from tf_breakeven.launch import experiment, validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [(m, d) for m in models.available() for d in data_lib.available()]


def _error(config):
    """The usage error of `config` (static checks and the model's image
    fit), or None if it passes."""
    try:
        validation.check_config(config)
        validation.check_model_fits(config)
    except app.UsageError as err:
        return str(err)
    return None


def test_every_zoo_model_has_a_known_kind_of_input():
    for name in models.available():
        assert validation.model_inputs(name) is not None, name
    kinds = {d: validation.dataset_inputs(d) for d in data_lib.available()}
    assert kinds["digits"] == (validation.IMAGES,)
    assert kinds["imdb_reviews"] == (validation.TOKENS,)
    assert validation.BERT_INPUTS in kinds["glue/mnli"]


@pytest.mark.parametrize("model,dataset", PAIRS)
def test_each_model_dataset_pair_runs_or_names_what_fits(model, dataset):
    config = config_lib.Config(model=model, dataset=dataset)
    message = _error(config)
    if message is None:
        assert validation.fits(model, dataset)
        return
    assert "\n" not in message
    assert f"--model={model}" in message
    proposal = re.split(r" \(or,| or a larger", message.split("such as ")[1])
    words = set(re.findall(r"[\w/]+", proposal[0]))
    named = [d for d in data_lib.available() if d != dataset and d in words]
    assert named, message
    # Every dataset the message proposes passes for this model.
    for other in named:
        assert _error(config.replace(dataset=other)) is None, (other, message)


@pytest.mark.parametrize(
    "model,dataset,expected",
    [
        ("bert", "digits", "glue/mnli"),
        ("bert", "imdb_reviews", "glue/mnli"),
        ("lstm", "cifar10", "imdb_reviews"),
        ("simple_cnn", "glue/mnli", "cifar10"),
        ("densenet121", "digits", "cifar10"),
        ("densenet121", "mnist", "imagenet2012"),
    ],
)
def test_misfits_name_a_dataset_that_fits(model, dataset, expected):
    message = _error(config_lib.Config(model=model, dataset=dataset))
    assert message is not None and expected in message


@pytest.mark.parametrize(
    "model,dataset",
    [
        ("simple_cnn", "digits"),
        ("lstm", "imdb_reviews"),
        ("lstm", "glue/mnli"),  # reads the BERT inputs' token_ids
        ("bert", "glue/mnli"),
        ("densenet121", "cifar10"),
        ("mlp", "imagenet2012"),
    ],
)
def test_pairs_that_fit_pass(model, dataset):
    assert _error(config_lib.Config(model=model, dataset=dataset)) is None


def test_digits_upsampled_enough_fits_densenet121():
    config = config_lib.Config(model="densenet121", image_size=32)
    assert _error(config) is None


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"model": "resnet50"}, "resnet32"),
        ({"dataset": "svhn"}, "cifar10"),
        ({"model_kwargs": {"width": 4}}, "'width'"),
        ({"model_kwargs": {"input_shape": (8, 8, 1)}}, "--image_size"),
        ({"model_kwargs": {"num_classes": 3}}, "set by the launcher"),
        ({"measure_every": "soon"}, "'epoch', 'log'"),
        ({"measure_every": "0"}, "positive"),
        (
            {"measure_every": "100", "steps_per_epoch": 4, "epochs": 2},
            "never fires in a run of 8 steps",
        ),
        (
            {"step_tracking_gram": True, "batch_size": 10},
            "--microbatch_size=4",
        ),
        (
            {
                "step_tracking_gram": True,
                "batch_size": 8,
                "microbatch_size": 8,
            },
            "at least two micro-batches",
        ),
        ({"steps_per_epoch": 0}, "--steps_per_epoch=0"),
        ({"step_tracking_every": -1}, "--step_tracking_every=-1"),
    ],
)
def test_impossible_flags_are_usage_errors(changes, match):
    config = config_lib.Config(**changes)
    with pytest.raises(app.UsageError, match=match) as info:
        validation.check_config(config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"model_kwargs": {"filters": (4, 8), "dense_units": 16}},
        {"measure_every": "8", "steps_per_epoch": 4, "epochs": 2},
        {"measure_every": "100", "tracking": "none", "steps_per_epoch": 4},
        {"step_tracking_gram": True, "batch_size": 8},
        {
            "step_tracking_gram": True,
            "batch_size": 10,
            "step_tracking_every": 0,
        },
        {
            "model": "bert",
            "dataset": "glue/mnli",
            "model_kwargs": {"preset": "p"},
        },
    ],
)
def test_possible_flags_pass(changes):
    validation.check_config(config_lib.Config(**changes))


@pytest.mark.parametrize("name", models.available())
def test_accepted_arguments_are_what_get_model_takes(name):
    accepted = models.accepted_arguments(name)
    assert list(accepted) == sorted(accepted)
    # Every tiny config key is accepted, and get_model refuses a key that
    # is not (naming the accepted ones).
    assert set(models.tiny_config(name)) <= set(accepted)
    with pytest.raises(ValueError, match="no_such_argument") as info:
        models.get_model(name, no_such_argument=1)
    assert ", ".join(accepted) in str(info.value)
    # The launcher's --model_arg check names the same keys.
    config = config_lib.Config(model=name, model_kwargs={"nope": 1})
    with pytest.raises(app.UsageError, match="'nope'") as info:
        validation.check_model_arguments(config)
    assert ", ".join(accepted) in str(info.value)


def test_accepted_arguments_of_a_builder_with_model_kwargs():
    assert {"filters", "dense_units", "name", "trainable"} <= set(
        models.accepted_arguments("simple_cnn")
    )
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.accepted_arguments("vgg")


def test_bert_preset_gives_only_the_number_of_classes():
    config = config_lib.Config(
        model="bert", dataset="glue/mnli", model_kwargs={"preset": "/p"}
    )

    class Spec:
        num_classes, input_shape = 3, None
        vocabulary_size, sequence_length = 100, 16

    arguments = experiment._model_arguments(config, Spec())
    assert arguments == {"num_classes": 3, "preset": "/p"}
    lstm = config.replace(model="lstm", model_kwargs={})
    assert experiment._model_arguments(lstm, Spec()) == {
        "num_classes": 3,
        "vocabulary_size": 100,
        "sequence_length": 16,
    }


@pytest.mark.parametrize(
    "changes,sizes,match",
    [
        # 0.001 of 1,437 digits: a probe of 1 example.
        ({"probe_fraction": 0.001}, (1437, 1, 1), "--probe_fraction >= "),
        (
            {"probe_fraction": 0.01, "microbatch_size": 16},
            (1437, 14, 1),
            "--probe_fraction >= 0.0223",
        ),
        (
            {"probe_fraction": 1.0, "microbatch_size": 1000},
            (1437, 1437, 1),
            "--microbatch_size <= 718",
        ),
        ({"measure_every": "100", "epochs": 2}, (1437, 72, 1), "22 steps"),
        ({"batch_size": 2048}, (1437, 72, 1), "use at most 1437"),
        (
            {"batch_size": 128, "steps_per_epoch": 3},
            (64, 32, 1),
            "use at most 64",
        ),
        ({"batch_size": 10}, (1437, 72, 4), "multiple of 4"),
        (
            {
                "step_tracking_gram": True,
                "batch_size": 32,
                "microbatch_size": 8,
            },
            (1437, 72, 4),
            "per replica",
        ),
    ],
)
def test_checks_against_the_data(changes, sizes, match):
    config = config_lib.Config(**changes)
    validation.check_config(config)
    with pytest.raises(app.UsageError, match=match):
        validation.check_against_data(config, *sizes)


def test_checks_against_the_data_pass_for_the_default():
    validation.check_against_data(config_lib.Config(), 1437, 72, 1)
    economy = config_lib.Config(tracking="economy", probe_fraction=0.001)
    validation.check_against_data(economy, 1437, 1, 1)


@pytest.mark.parametrize(
    "arguments,expected",
    [
        (["--model=bert"], "glue/mnli"),
        # Passes the static checks; the strategy finds no TPU.
        (["--strategy=tpu", "--epochs=1"], "--strategy=tpu found no TPU"),
    ],
)
def test_cli_prints_a_usage_error_without_traceback(
    arguments, expected, tmp_path
):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_breakeven.launch.train",
            f"--workdir={tmp_path / 'run'}",
            *arguments,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_build_checks_before_reading_data_and_names_what_fits(tmp_path):
    """experiment.build (also the sweep's path) runs the same checks: the
    static ones before the workdir or data, the model's fit when the real
    build fails."""
    with pytest.raises(app.UsageError, match="glue/mnli"):
        experiment.build(config_lib.Config(model="bert"), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    config = config_lib.Config(model="densenet121", tracking="none")
    with pytest.raises(app.UsageError, match="such as cifar10"):
        experiment.build(config, str(tmp_path / "b"))
